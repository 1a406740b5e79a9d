"""Reading and checking JSON Lines data before any model is touched, and turning rows into TRL's format.

Every problem in every file is collected and reported at once as `file:line: field: what is wrong`, so a user
fixes a file in one pass instead of one crash at a time.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import ToolkitError
from toolkit.formatters import FORMATTERS, OPTIONAL_TEXT_FIELDS, REQUIRED_FIELDS

MAX_PROBLEMS_SHOWN = 25
BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Row:
    """One data row and where it came from, so later problems (e.g. too long) can still point at its line."""

    source: str
    line: int
    fields: dict


def json_type_name(value) -> str:
    return {bool: "boolean", int: "number", float: "number", type(None): "null", list: "list", dict: "object"}.get(
        type(value), type(value).__name__
    )


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


def parse_jsonl(path: Path, formatter: str) -> tuple[list[Row], list[str]]:
    """Parse and check a file. Returns the good rows and every problem found (as `file:line: message`)."""
    raw = path.read_bytes()
    if raw.startswith(BOM):
        raw = raw[len(BOM) :]
    rows, problems = [], []
    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        line_bytes = line_bytes.rstrip(b"\r")
        where = f"{path}:{number}"
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as err:
            problems.append(f"{where}: not valid UTF-8 (byte {err.start + 1} of the line)")
            continue
        if not line.strip():
            continue
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as err:
            problems.append(f"{where}: invalid JSON ({err.msg} at column {err.colno})")
            continue
        if not isinstance(fields, dict):
            problems.append(f"{where}: expected a JSON object, got {json_type_name(fields)}")
            continue
        row_issues = row_problems(fields, formatter)
        problems.extend(f"{where}: {issue}" for issue in row_issues)
        if not row_issues:
            rows.append(Row(str(path), number, fields))
    if not rows and not problems:
        problems.append(f"{path}: no rows (the file is empty)")
    return rows, problems


def check_file_exists(path_text: str, key: str) -> list[str]:
    path = Path(path_text)
    if not path.exists():
        return [f"{key}: file not found: {path} (relative paths are read from the current directory, {Path.cwd()})"]
    if not path.is_file():
        return [f"{key}: not a file: {path}"]
    return []


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
    problems = [p for key, path in files.items() for p in check_file_exists(path, key)]
    raise_problems(problems, "data")
    train, problems = parse_jsonl(Path(data_section.train), data_section.formatter)
    eval_rows: list[Row] = []
    if data_section.eval:
        eval_rows, eval_problems = parse_jsonl(Path(data_section.eval), data_section.formatter)
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


def to_conversation(row: Row, data_section) -> dict:
    """A row in TRL's conversational prompt-completion form, with the template's date pinned."""
    example = FORMATTERS[data_section.formatter](row.fields, data_section.system_prompt)
    example["chat_template_kwargs"] = {"date_string": data_section.date_string}
    return example


def render_text(example: dict, tokenizer) -> str:
    """The exact training text for one example (prompt + completion), for lengths, previews and tests."""
    return tokenizer.apply_chat_template(
        example["prompt"] + example["completion"], tokenize=False, **example["chat_template_kwargs"]
    )


def token_lengths(rows: list[Row], data_section, tokenizer) -> list[int]:
    if not rows:
        return []
    texts = [render_text(to_conversation(r, data_section), tokenizer) for r in rows]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [len(ids) for ids in encoded]


def percentiles(values: list[int], points=(50, 90, 99, 100)) -> dict[str, int]:
    ordered = sorted(values)
    return {f"p{p}": ordered[min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))] for p in points}


def to_dataset(rows: list[Row], data_section):
    from datasets import Dataset

    return Dataset.from_list([to_conversation(r, data_section) for r in rows])


def read_glossary(path: str) -> list[str]:
    lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    return [t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")]


def prompt_text(fields: dict, data_section, tokenizer) -> str:
    """The prompt exactly as training formatted it, ending where the assistant's answer starts (for generation)."""
    example = FORMATTERS[data_section.formatter](fields, data_section.system_prompt)
    return tokenizer.apply_chat_template(
        example["prompt"], tokenize=False, add_generation_prompt=True, date_string=data_section.date_string
    )
