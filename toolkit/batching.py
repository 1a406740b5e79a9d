"""Batches of similar length: the cheapest large speed-up for rows of mixed length.

Dynamic padding pads each batch to its longest row; when rows of 70 and 370 tokens share a batch, most of the
compute goes to padding. transformers' LengthGroupedSampler only sorts within a few batches on small data sets,
so the toolkit orders the rows itself and lets the Trainer read them in that order.
"""

from __future__ import annotations

import math
import random

# Sorting across a whole data set makes every batch a slice of one length band, and on the quickstart that changed
# what was learned (eval loss 6.92 vs 6.70, term accuracy 0.21 vs 0.36); windows of 8 batches stayed within seed
# noise (6.77, 0.38) and still remove most padding (92% real tokens vs 61% for rows of 70-370 tokens).
WINDOW_BATCHES = 8


def epoch_stream(n_rows: int, epochs: float, seed: int) -> list[int]:
    """Row indices for `epochs` passes, each pass freshly shuffled; a fractional last pass is cut short."""
    passes = []
    for epoch in range(math.ceil(epochs)):
        order = list(range(n_rows))
        random.Random(seed + epoch).shuffle(order)
        passes.extend(order)
    return passes[: round(epochs * n_rows)]


def length_grouped_order(lengths: list[int], batch_size: int, epochs: float, seed: int,
                         window_batches: int = WINDOW_BATCHES, apart: list[bool] | None = None) -> list[int]:
    """The training order: a shuffled multi-epoch stream, sorted by length inside windows of `window_batches`
    batches, cut into batches, and the batches shuffled so long and short ones alternate at random.

    Rows flagged in `apart` (rows with images) sort after the others inside each window, so they share batches:
    Mllama's vision tower runs over every row of a batch that holds any image, text rows' empty slots included.

    Only the very last batch can be short, so the Trainer's batch boundaries match these batches exactly. A window
    that straddles two passes may hold the same row twice; every row is still seen once per pass.
    """
    stream = epoch_stream(len(lengths), epochs, seed)
    flags = apart or [False] * len(lengths)
    rng = random.Random(seed)
    batches = []
    window = batch_size * window_batches
    for start in range(0, len(stream), window):
        ordered = sorted(stream[start : start + window], key=lambda i: (flags[i], lengths[i]))
        batches.extend(ordered[j : j + batch_size] for j in range(0, len(ordered), batch_size))
    tail = batches.pop() if batches and len(batches[-1]) < batch_size else None
    rng.shuffle(batches)
    if tail:
        batches.append(tail)
    return [i for batch in batches for i in batch]
