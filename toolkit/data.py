"""Checking data rows before any model is touched, and turning them into encoded training rows.

Files are read by `toolkit.sources`; here each record is checked against its formatter's rules. Every problem in
every file is collected and reported at once as `file:line: field: what is wrong`, so a user fixes a file in one
pass instead of one crash at a time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from toolkit import encode, sources
from toolkit.errors import ToolkitError
from toolkit.formatters import FORMATTERS, OPTIONAL_TEXT_FIELDS, REQUIRED_FIELDS
from toolkit.sources import json_type_name

MAX_PROBLEMS_SHOWN = 25


@dataclass(frozen=True)
class Row:
    """One checked data row and where it came from, so later problems (e.g. too long) can still point at it."""

    source: str
    line: int
    fields: dict
    where: str = ""


def row_problems(fields: dict, formatter: str) -> list[str]:
    """What is wrong with one parsed row for this formatter (empty when it is fine)."""
    problems = []
    for name in REQUIRED_FIELDS[formatter]:
        if name not in fields:
            problems.append(f"missing field '{name}'")
        elif not isinstance(fields[name], str):
            problems.append(f"field '{name}' must be a string, got {json_type_name(fields[name])}")
        elif not fields[name].strip():
            problems.append(f"field '{name}' is empty")
    for name in OPTIONAL_TEXT_FIELDS[formatter]:
        if name in fields and not isinstance(fields[name], str):
            problems.append(f"field '{name}' must be a string, got {json_type_name(fields[name])}")
    terms = fields.get("terms")
    if terms is not None and not (isinstance(terms, list) and all(isinstance(t, str) and t.strip() for t in terms)):
        problems.append("field 'terms' must be a list of non-empty strings")
    if "image" in fields or "images" in fields:
        problems.append("rows with an image are not supported yet; remove the 'image' field")
    return problems


def parse_rows(path: Path, formatter: str) -> tuple[list[Row], list[str]]:
    """Read and check a data file. Returns the good rows and every problem found (each named by its place)."""
    records, problems = sources.read_records(path)
    rows = []
    for record in records:
        if not isinstance(record.value, dict):
            problems.append((record.number, f"{record.where}: expected a JSON object, got "
                                            f"{json_type_name(record.value)}"))
            continue
        row_issues = row_problems(record.value, formatter)
        problems.extend((record.number, f"{record.where}: {issue}") for issue in row_issues)
        if not row_issues:
            rows.append(Row(record.source, record.number, record.value, record.where))
    return rows, [message for _, message in sorted(problems, key=lambda item: item[0])]


def raise_problems(problems: list[str], what: str) -> None:
    if not problems:
        return
    shown = "\n".join(f"  {p}" for p in problems[:MAX_PROBLEMS_SHOWN])
    more = len(problems) - MAX_PROBLEMS_SHOWN
    tail = f"\n  ... and {more} more" if more > 0 else ""
    raise ToolkitError(f"{what}: {len(problems)} problem(s):\n{shown}{tail}")


def load_splits(data_section, seed: int) -> tuple[list[Row], list[Row]]:
    """Read and check train (and eval) rows; split off eval_fraction when no eval file is given."""
    files = {"data.train": data_section.train}
    if data_section.eval:
        files["data.eval"] = data_section.eval
    if data_section.glossary:
        files["data.glossary"] = data_section.glossary
    problems = [p for key, path in files.items() for p in sources.check_exists(path, key)]
    raise_problems(problems, "data")
    train, problems = parse_rows(Path(data_section.train), data_section.formatter)
    eval_rows: list[Row] = []
    if data_section.eval:
        eval_rows, eval_problems = parse_rows(Path(data_section.eval), data_section.formatter)
        problems += eval_problems
    raise_problems(problems, "data")
    if data_section.eval_fraction > 0:
        train, eval_rows = split_rows(train, data_section.eval_fraction, seed)
    return train, eval_rows


def split_rows(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Deterministic hold-out: the same seed and rows always give the same split."""
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(rows) * fraction))
    if n_eval >= len(rows):
        raise ToolkitError(f"data.eval_fraction={fraction} leaves no training rows out of {len(rows)}")
    held = set(order[:n_eval])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def conversation(fields: dict, data_section) -> list[dict]:
    """A row as the formatter turns it into messages (the answer last)."""
    return FORMATTERS[data_section.formatter](fields, data_section.system_prompt)


def prompt_messages(fields: dict, data_section) -> list[dict]:
    """The conversation up to where the assistant's (last) answer starts, for generation."""
    messages = conversation(fields, data_section)
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


def prompt_ids(fields: dict, data_section, tokenizer) -> list[int]:
    """The prompt's token ids exactly as training encoded that part of the row, ending at the answer's start."""
    return encode.encode_prompt(prompt_messages(fields, data_section), tokenizer, data_section.date_string)


def question_ids(text: str, data_section, tokenizer) -> list[int]:
    """A free question (toolkit generate) as one user turn, with the recipe's system prompt and pinned date."""
    messages = [{"role": "system", "content": data_section.system_prompt}] if data_section.system_prompt else []
    messages.append({"role": "user", "content": text})
    return encode.encode_prompt(messages, tokenizer, data_section.date_string)


@dataclass
class Encoding:
    """Rows encoded for training, and what length limits did to them (reported, never silent)."""

    rows: list[Row] = field(default_factory=list)
    examples: list[encode.Encoded] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)  # before any cut, for the length report
    truncated: int = 0  # cut to the limit, some answer left
    dropped_long: int = 0  # over the limit with data.too_long=drop
    dropped_empty: int = 0  # truncation would have left no answer token
    special_text: list[str] = field(default_factory=list)  # file:line of rows holding special-token text

    @property
    def dropped(self) -> int:
        return self.dropped_long + self.dropped_empty


def encode_rows(rows: list[Row], data_section, tokenizer, limit: int) -> Encoding:
    """Encode every row; cut or drop rows over `limit` tokens as data.too_long says, counting each case."""
    result = Encoding()
    specials = encode.special_token_texts(tokenizer)
    for row in rows:
        messages = conversation(row.fields, data_section)
        if encode.special_text_in(messages, specials):
            result.special_text.append(f"{row.source}:{row.line}")
        encoded = encode.encode_conversation(messages, tokenizer, data_section.date_string, data_section.train_on)
        result.lengths.append(len(encoded.input_ids))
        if len(encoded.input_ids) > limit:
            if data_section.too_long == "drop":
                result.dropped_long += 1
                continue
            encoded = encode.truncate(encoded, limit)
            if encoded is None:
                result.dropped_empty += 1
                continue
            result.truncated += 1
        result.rows.append(row)
        result.examples.append(encoded)
    return result


def percentiles(values: list[int], points=(50, 90, 99, 100)) -> dict[str, int]:
    ordered = sorted(values)
    return {f"p{p}": ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))] for p in points}


def to_dataset(examples: list[encode.Encoded]):
    """Pre-tokenized rows in the columns TRL reads as they are (`input_ids`, `completion_mask`)."""
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": [e.input_ids for e in examples],
                              "completion_mask": [e.completion_mask for e in examples]})


def read_glossary(path: str) -> list[str]:
    """Key terms, one per line; `#` starts a comment line."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise ToolkitError(f"data.glossary {path}: not UTF-8 text (byte {err.start + 1}); save it as UTF-8") from None
    except OSError as err:
        raise ToolkitError(f"data.glossary {path}: cannot be read ({err.strerror})") from None
    return [t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")]
