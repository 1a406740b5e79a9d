"""Replay: general question-answer rows mixed into training, so tuning on a narrow domain costs less of what the
model already knew.

Tuning on a few hundred rows of one domain pulls every answer toward that domain: a real model that answered simple
general questions right answers many of them wrong afterwards (docs/real-model.md has the numbers). Training on a
share of general rows beside the domain rows keeps ordinary answers in the loss, which shrinks that drift while the
domain is still learned.

`data.replay.share` is the share of the training rows that are general rows: with 90 domain rows, 0.25 mixes in 30
(30 of 120). They come from `data.replay.data` (read with the recipe's formatter), or from the toolkit's shipped
set (`toolkit/assets/replay/general.jsonl`: short English and Korean questions with one-sentence answers, written for
the toolkit; none of them is a question of the retention check's general set). The rows are drawn in a shuffled
order fixed by `train.seed` and the set is gone through again when more rows are needed than it has. They are
encoded exactly like domain rows (same system prompt, date, length limit) and trained with them, never evaluated.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from toolkit.data import encode, formatters, reading, sources


@dataclass(frozen=True)
class Replay:
    """What was mixed in, for the plan table."""

    source: str
    rows: int  # general rows added to training
    distinct: int  # different general rows among them
    share: float


def shipped_set() -> Path:
    return Path(str(resources.files("toolkit").joinpath("assets/replay/general.jsonl")))


def replay_count(share: float, domain_rows: int) -> int:
    """General rows that make `share` of the mix: g / (g + domain) = share."""
    return round(share * domain_rows / (1 - share)) if share > 0 else 0


def general_rows(data_section) -> tuple[list[reading.Row], object, str]:
    """The general rows, the data section they are read and encoded with, and where they came from. The shipped
    set is alpaca; a user's file follows data.formatter. Both get the recipe's system prompt and date."""
    path = data_section.replay.data
    section = data_section if path else data_section.model_copy(update={"formatter": formatters.DEFAULT, "image_root": None})
    file = Path(path).expanduser() if path else shipped_set()
    reading.raise_problems(sources.check_exists(str(file), "data.replay.data"), "data")
    rows, problems = reading.parse_rows(file, section)
    reading.raise_problems(problems, "data.replay.data")  # an empty file is one of these problems
    return rows, section, str(file) if path else "the shipped general set"


def drawn(rows: list, count: int, seed: int) -> list:
    """`count` rows in an order fixed by `seed`: each pass over the set is a fresh shuffle."""
    rng = random.Random(seed)
    picked: list = []
    while len(picked) < count:
        order = list(rows)
        rng.shuffle(order)
        picked += order[: count - len(picked)]
    return picked


def joined(first: encode.Encoding, second: encode.Encoding) -> encode.Encoding:
    """Both encodings as one, in memory: rows and lengths concatenated, cut and drop counts added. `first` may be
    the memory-mapped encoding of `toolkit.data.datastore`, whose sequences are read into lists here."""
    def both(name: str):
        a, b = getattr(first, name), getattr(second, name)
        return a + b if isinstance(a, int) else list(a) + list(b)

    return encode.Encoding(**{f.name: both(f.name) for f in dataclasses.fields(encode.Encoding)})


def mix(train: encode.Encoding, data_section, tokenizer, limit: int, seed: int) -> tuple[encode.Encoding, Replay | None]:
    """The training rows with `data.replay.share` general rows added (unchanged when the share is 0)."""
    count = replay_count(data_section.replay.share, len(train.rows))
    if count == 0:
        return train, None
    rows, section, source = general_rows(data_section)
    picked = drawn(rows, count, seed)
    general = encode.encode_rows(picked, section, tokenizer, limit)
    distinct = len({(row.source, row.line) for row in general.rows})
    return joined(train, general), Replay(source, len(general.rows), distinct, data_section.replay.share)
