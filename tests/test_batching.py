"""Length grouping: the order is pinned (windows of 8 batches sorted by length, batches shuffled), every row is
seen once per pass, and most padding goes."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from toolkit.data.batching import epoch_stream, length_grouped_order, shared_modality_batches


def lengths(n=336, seed=0):
    rng = random.Random(seed)
    return [rng.randint(70, 370) for _ in range(n)]


def batches_of(order: list[int], batch_size: int) -> list[tuple[int, ...]]:
    return [tuple(order[i : i + batch_size]) for i in range(0, len(order), batch_size)]


def real_token_share(rows: list[int], order: list[int], batch_size: int) -> float:
    """Real tokens / padded tokens when each batch is padded to its longest row."""
    batches = [[rows[i] for i in batch] for batch in batches_of(order, batch_size)]
    return sum(map(sum, batches)) / sum(max(b) * len(b) for b in batches)


def test_every_pass_sees_every_row_once():
    order = length_grouped_order(lengths(), batch_size=16, epochs=3, seed=42)
    assert Counter(order) == Counter({i: 3 for i in range(336)})


def test_fractional_epochs_cut_the_last_pass():
    stream = epoch_stream(100, 1.5, seed=0)
    assert len(stream) == 150 and sorted(stream[:100]) == list(range(100)) and len(set(stream[100:])) == 50


def test_batches_are_sorted_slices_of_windows_of_eight_batches():
    """Each batch is a slice of one window of 8 x batch_size rows of the shuffled stream, sorted by length; a full
    sort, another window size or no grouping gives other batches."""
    rows, batch_size = lengths(), 4
    stream = epoch_stream(len(rows), 2, seed=3)
    window = 8 * batch_size
    expected = []
    for start in range(0, len(stream), window):
        ordered = sorted(stream[start : start + window], key=lambda i: rows[i])
        expected += batches_of(ordered, batch_size)
    got = batches_of(length_grouped_order(rows, batch_size, epochs=2, seed=3), batch_size)
    assert Counter(got) == Counter(expected)
    assert got != expected  # the batches themselves are shuffled, so long and short ones alternate


def test_grouped_batches_waste_little_padding():
    rows = lengths()
    grouped = length_grouped_order(rows, batch_size=32, epochs=3, seed=42)
    shuffled = epoch_stream(len(rows), 3, seed=42)
    assert real_token_share(rows, grouped, 32) > 0.9
    assert real_token_share(rows, shuffled, 32) < 0.7


def test_order_is_deterministic_and_only_the_last_batch_is_short():
    rows = lengths(100)
    first = length_grouped_order(rows, batch_size=16, epochs=1, seed=7)
    assert first == length_grouped_order(rows, batch_size=16, epochs=1, seed=7)
    assert first != length_grouped_order(rows, batch_size=16, epochs=1, seed=8)
    assert [len(b) for b in batches_of(first, 16)] == [16] * 6 + [4]


def test_rows_with_images_share_batches_inside_each_window():
    rows = lengths(256)
    images = [i % 10 == 0 for i in range(256)]  # 26 image rows among 256
    order = length_grouped_order(rows, batch_size=16, epochs=1, seed=5, apart=images)
    assert sorted(order) == list(range(256))
    mixed = [b for b in batches_of(order, 16) if any(images[i] for i in b)]
    assert len(mixed) <= 4  # 2 windows of 128 rows, each with its image rows at its end: at most 2 batches each
    assert sum(images[i] for b in mixed for i in b) == 26
    assert length_grouped_order(rows, batch_size=16, epochs=1, seed=5) == length_grouped_order(
        rows, batch_size=16, epochs=1, seed=5, apart=[False] * 256)


def modalities(batches: list[list[int]], images: list[bool], processes: int) -> list[str]:
    """Per process, one letter per step: "i" when its batch holds an image row, "t" when it holds none."""
    return ["".join("i" if any(images[i] for i in b) else "t" for b in batches[p::processes])
            for p in range(processes)]


def test_shared_batches_give_every_process_the_same_modality_at_every_step():
    images = [i % 3 == 0 for i in range(31)]  # 11 image rows, 20 text rows
    batches = shared_modality_batches(images, micro_batch=2, processes=2, epochs=2, seed=42)
    first, second = modalities(batches, images, 2)
    assert first == second == "ttttitiittttitii"
    # text batches hold no image row; image batches only real rows: no row appears that the data does not have
    assert Counter(i for b in batches for i in b) == Counter(epoch_stream(31, 2, seed=42))
    assert [len(b) for b in batches[8:10]] == [2, 1] and all(b for b in batches)  # a last round of 3 image rows


def test_shared_batches_hold_the_same_rows_as_one_process_for_any_shape():
    for n, share, micro_batch, processes, epochs in [(17, 5, 1, 2, 1), (40, 7, 3, 4, 2.5), (9, 2, 4, 2, 3),
                                                       (64, 7, 2, 8, 1.25), (23, 6, 1, 3, 2)]:
        images = [i % share == 0 for i in range(n)]
        lengths = [(7 * i) % 50 + 10 for i in range(n)]
        for grouped in (None, lengths):
            batches = shared_modality_batches(images, micro_batch, processes, epochs, seed=3, lengths=grouped)
            assert Counter(i for b in batches for i in b) == Counter(epoch_stream(n, epochs, seed=3))
            assert len(batches) % processes == 0 and all(0 < len(b) <= micro_batch + 1 for b in batches)
            assert len(set(modalities(batches, images, processes))) == 1, (n, share, micro_batch, processes)


def test_a_few_text_rows_join_an_image_round_never_the_reverse():
    images = [True] * 4 + [False]  # one text row cannot fill a text step on 2 processes
    batches = shared_modality_batches(images, micro_batch=2, processes=2, epochs=1, seed=0)
    assert batches == [[2, 0, 4], [1, 3]]  # images dealt first, so each process keeps one; the text row rides along


def test_shared_batches_refuse_fewer_image_rows_than_processes():
    with pytest.raises(ValueError, match="1 rows with images cannot give each of 2 processes an image in the same "
                                         "step"):
        shared_modality_batches([True] + [False] * 8, micro_batch=2, processes=2, epochs=1, seed=0)


def test_shared_batches_come_from_the_seed():
    images = [i % 4 == 0 for i in range(40)]
    first = shared_modality_batches(images, 2, 2, 2, seed=7)
    assert first == shared_modality_batches(images, 2, 2, 2, seed=7)
    assert first != shared_modality_batches(images, 2, 2, 2, seed=8)
