"""Length grouping keeps every row of every pass and removes most padding."""

from __future__ import annotations

import random
from collections import Counter

from toolkit.batching import epoch_stream, length_grouped_order, padding_efficiency


def lengths(n=336, seed=0):
    rng = random.Random(seed)
    return [rng.randint(70, 370) for _ in range(n)]


def test_every_pass_sees_every_row_once():
    order = length_grouped_order(lengths(), batch_size=16, epochs=3, seed=42)
    assert Counter(order) == Counter({i: 3 for i in range(336)})


def test_fractional_epochs_cut_the_last_pass():
    assert len(epoch_stream(100, 1.5, seed=0)) == 150


def test_grouped_batches_waste_little_padding():
    rows = lengths()
    grouped = length_grouped_order(rows, batch_size=32, epochs=3, seed=42)
    shuffled = epoch_stream(len(rows), 3, seed=42)
    assert padding_efficiency(rows, grouped, 32) > 0.9
    assert padding_efficiency(rows, shuffled, 32) < 0.7


def test_order_is_deterministic_and_only_the_last_batch_is_short():
    rows = lengths(100)
    first = length_grouped_order(rows, batch_size=16, epochs=1, seed=7)
    assert first == length_grouped_order(rows, batch_size=16, epochs=1, seed=7)
    assert first != length_grouped_order(rows, batch_size=16, epochs=1, seed=8)
    batches = [first[i : i + 16] for i in range(0, len(first), 16)]
    assert [len(b) for b in batches] == [16] * 6 + [4]
