"""Reading data files into records (one JSON-like object per row, with where it came from), before any row check.

Every problem is collected, not raised one at a time, and named by its place (`file:line` for line-based files,
`file row N` otherwise), so a user fixes a file in one pass. What a row must contain is checked later, by the
formatter's rules (`toolkit.data`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BOM = b"\xef\xbb\xbf"


@dataclass(frozen=True)
class Record:
    """One row as read from a file: `where` names it in messages (`file:line` or `file row N`)."""

    source: str
    number: int
    where: str
    value: Any


def json_type_name(value) -> str:
    return {bool: "boolean", int: "number", float: "number", type(None): "null", list: "list", dict: "object"}.get(
        type(value), type(value).__name__
    )


def lone_surrogate(value) -> bool:
    """Whether a parsed JSON value holds a lone UTF-16 surrogate (`"\\ud800"` parses, but is not Unicode text)."""
    if isinstance(value, str):
        return any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, dict):
        return any(lone_surrogate(k) or lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(lone_surrogate(v) for v in value)
    return False


def parse_json_text(text: str) -> tuple[Any, str | None]:
    """A JSON value, or the reason it is not one; never raises (deep nesting and huge numbers included)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"invalid JSON ({err.msg} at column {err.colno})"
    except RecursionError:
        return None, "invalid JSON (nested too deeply)"
    except ValueError as err:  # e.g. an integer with more digits than Python converts
        return None, f"invalid JSON ({str(err).splitlines()[0]})"
    if lone_surrogate(value):
        return None, "invalid text (a lone surrogate escape such as \\ud800, which is not a character)"
    return value, None


Problems = list[tuple[int, str]]  # (line or row number, message), so they can be listed in file order


def read_jsonl(path: Path) -> tuple[list[Record], Problems]:
    """JSON Lines: one value per line; a BOM, CRLF line ends and blank lines are fine."""
    raw = path.read_bytes()
    if raw.startswith(BOM):
        raw = raw[len(BOM) :]
    records, problems = [], []
    for number, line_bytes in enumerate(raw.split(b"\n"), start=1):
        line_bytes = line_bytes.rstrip(b"\r")
        where = f"{path}:{number}"
        try:
            line = line_bytes.decode("utf-8")
        except UnicodeDecodeError as err:
            problems.append((number, f"{where}: not valid UTF-8 (byte {err.start + 1} of the line)"))
            continue
        if not line.strip():
            continue
        value, problem = parse_json_text(line)
        if problem:
            problems.append((number, f"{where}: {problem}"))
            continue
        records.append(Record(str(path), number, where, value))
    return records, problems


def read_records(path: Path) -> tuple[list[Record], Problems]:
    """Every record of a data file and every problem reading it; an empty file is a problem."""
    try:
        records, problems = read_jsonl(path)
    except OSError as err:
        return [], [(0, f"{path}: cannot be read ({err.strerror})")]
    if not records and not problems:
        problems.append((0, f"{path}: no rows (the file is empty)"))
    return records, problems


def check_exists(path_text: str, key: str) -> list[str]:
    path = Path(path_text)
    if not path.exists():
        return [f"{key}: file not found: {path} (relative paths are read from the current directory, {Path.cwd()})"]
    if not path.is_file():
        return [f"{key}: not a file: {path}"]
    return []
