"""Reading data files into records (one JSON-like object per row, with where it came from), before any row check.

The file type follows the name: `.jsonl` (JSON Lines), `.json` (one JSON array of row objects), `.csv` (a header
line, then one row per record), `.parquet`, or a folder written by `datasets`' `save_to_disk`. Every reader yields
the same `Record`s, so what a row must contain is checked once, by the formatter's rules (`toolkit.data`), whatever
the file type.

Every problem is collected, not raised one at a time, and named by its place (`file:line` for the text formats,
`file row N` for Parquet, saved datasets and JSON arrays written on one line), so a user fixes a file in one pass.
A reader never raises for what is in a file: a damaged or foreign file is one problem line.

Files are read once and only the rows are kept: JSON Lines and CSV are parsed line by line as they are read,
Parquet and saved datasets one Arrow batch at a time (a saved dataset is memory-mapped, never loaded whole). A JSON
array needs its whole text (the standard library has no streaming parser); its bytes are freed once decoded and its
elements are parsed one at a time, so at most the text and the rows are held together.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from toolkit.errors import first_line

BOM = b"\xef\xbb\xbf"
KINDS_TEXT = ".jsonl, .json, .csv, .parquet, or a folder saved with datasets' save_to_disk"
ARROW_BATCH_ROWS = 1024  # rows per Arrow batch turned into Python objects at a time
JSON_SPACE = re.compile(r"[ \t\n\r]*")  # the only whitespace JSON allows between values


@dataclass(frozen=True)
class Record:
    """One row as read from a file: `where` names it in messages (`file:line` or `file row N`)."""

    source: str
    number: int
    where: str
    value: Any
    text: str | None = field(default=None, compare=False, repr=False)  # the JSON text, when the file held it



def json_type_name(value) -> str:
    """A JSON value's type as JSON names it, for messages about rows."""
    return {bool: "boolean", int: "number", float: "number", type(None): "null", list: "list", dict: "object",
            str: "string"}.get(type(value), type(value).__name__)


def lone_surrogate(value) -> bool:
    """Whether a parsed JSON value holds a lone UTF-16 surrogate (`"\\ud800"` parses, but is not Unicode text)."""
    if isinstance(value, str):
        return any("\ud800" <= c <= "\udfff" for c in value)
    if isinstance(value, dict):
        return any(lone_surrogate(k) or lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(lone_surrogate(v) for v in value)
    return False


MAYBE_SURROGATE = re.compile(r"\\u[dD][89abcdefABCDEF]")
LONE_SURROGATE = "invalid text (a lone surrogate escape such as \\ud800, which is not a character)"


def parse_json_text(text: str) -> tuple[Any, str | None]:
    """A JSON value, or the reason it is not one; never raises (deep nesting and huge numbers included)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        return None, f"invalid JSON ({err.msg} at column {err.colno})"
    except RecursionError:
        return None, "invalid JSON (nested too deeply)"
    except ValueError as err:  # e.g. an integer with more digits than Python converts
        return None, f"invalid JSON ({first_line(err)})"
    if MAYBE_SURROGATE.search(text) and lone_surrogate(value):  # only a \uD800-\uDFFF escape can make one
        return None, LONE_SURROGATE
    return value, None


Problems = list[tuple[int, str]]  # (line or row number, message), so they can be listed in file order


def jsonl_record(path: Path, number: int, line_bytes: bytes) -> tuple[Record | None, tuple[int, str] | None]:
    """One JSON Lines line as a record, or its problem; (None, None) for a blank line. A BOM on line 1 is dropped."""
    if number == 1 and line_bytes.startswith(BOM):
        line_bytes = line_bytes[len(BOM) :]
    line_bytes = line_bytes.rstrip(b"\n").rstrip(b"\r")
    where = f"{path}:{number}"
    try:
        line = line_bytes.decode("utf-8")
    except UnicodeDecodeError as err:
        return None, (number, f"{where}: not valid UTF-8 (byte {err.start + 1} of the line)")
    if not line.strip():
        return None, None
    value, problem = parse_json_text(line)
    if problem:
        return None, (number, f"{where}: {problem}")
    return Record(str(path), number, where, value, line), None


def read_jsonl(path: Path) -> tuple[list[Record], Problems]:
    """JSON Lines: one value per line, read line by line; a BOM, CRLF line ends and blank lines are fine."""
    records, problems = [], []
    with path.open("rb") as handle:
        for number, line_bytes in enumerate(handle, start=1):
            record, problem = jsonl_record(path, number, line_bytes)
            if problem:
                problems.append(problem)
            elif record:
                records.append(record)
    return records, problems


def decode_whole(path: Path) -> tuple[str | None, Problems]:
    """A whole text file as UTF-8 (a BOM is dropped), or where its first invalid byte is."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig"), []
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        column = err.start - (raw.rfind(b"\n", 0, err.start) + 1) + 1
        return None, [(line, f"{path}:{line}: not valid UTF-8 (byte {column} of the line)")]


class ArrayShapeError(ValueError):
    """The text is not one JSON array of values; `line` is where that shows (0: the whole file)."""

    def __init__(self, message: str, line: int):
        super().__init__(message)
        self.line = line


class LineCounter:
    """Line numbers of increasing positions in a text, counted forward only: one pass over a whole file."""

    def __init__(self, text: str):
        self.text, self.position, self.line = text, 0, 1

    def at(self, position: int) -> int:
        self.line += self.text.count("\n", self.position, position)
        self.position = position
        return self.line


def json_array_items(text: str) -> Iterator[tuple[int, Any]]:
    """(line, value) for each element of a top-level JSON array, parsed one element at a time.

    Raises ArrayShapeError, with the line where it shows, when the text is not one array of JSON values.
    """
    decoder, lines = json.JSONDecoder(), LineCounter(text)
    position = JSON_SPACE.match(text).end()
    if position == len(text):
        raise ArrayShapeError("no rows (the file is empty)", 0)
    if text[position] != "[":
        raise ArrayShapeError(not_an_array(text[position]), lines.at(position))
    position = JSON_SPACE.match(text, position + 1).end()
    if text.startswith("]", position):
        raise ArrayShapeError("no rows (the array is empty)", 0)
    while True:
        line = lines.at(position)
        value, position = decode_element(decoder, text, position, line)
        yield line, value
        position = JSON_SPACE.match(text, position).end()
        if text.startswith("]", position):
            break
        if not text.startswith(",", position):
            raise ArrayShapeError("invalid JSON (expected ',' or ']' after an array element)", lines.at(position))
        position = JSON_SPACE.match(text, position + 1).end()
    position = JSON_SPACE.match(text, position + 1).end()
    if position != len(text):
        raise ArrayShapeError("invalid JSON (more text after the array's closing ']')", lines.at(position))


def decode_element(decoder: json.JSONDecoder, text: str, position: int, line: int) -> tuple[Any, int]:
    """The array element starting at `position` and where it ends; every way it can fail is an ArrayShapeError."""
    try:
        return decoder.raw_decode(text, position)
    except json.JSONDecodeError as err:
        raise ArrayShapeError(f"invalid JSON ({err.msg} at column {err.colno})", err.lineno) from None
    except RecursionError:
        raise ArrayShapeError("invalid JSON (nested too deeply)", line) from None
    except ValueError as err:  # e.g. an integer with more digits than Python converts
        raise ArrayShapeError(f"invalid JSON ({first_line(err)})", line) from None


def not_an_array(first: str) -> str:
    kind = {"{": "an object", '"': "a string"}.get(first, "another value")
    hint = "; a file with one object per line is JSON Lines: name it .jsonl" if kind == "an object" else ""
    return f"expected a JSON array of row objects ([{{...}}, {{...}}]), got {kind}{hint}"


def read_json_array(path: Path) -> tuple[list[Record], Problems]:
    """A `.json` file: one array of row objects. Rows are named `file:line` when each element starts on a line of
    its own (pretty-printed files), else `file row N` (an array written on one line)."""
    text, problems = decode_whole(path)
    if text is None:
        return [], problems
    items: list[tuple[int, Any]] = []
    try:
        for line, value in json_array_items(text):
            items.append((line, value))
    except ArrayShapeError as err:
        where = f"{path}:{err.line}" if err.line else str(path)
        problems.append((err.line, f"{where}: {err}"))
    del text
    by_line = len({line for line, _ in items}) == len(items)
    records = []
    for row, (line, value) in enumerate(items, start=1):
        number, where = (line, f"{path}:{line}") if by_line else (row, f"{path} row {row}")
        if lone_surrogate(value):
            problems.append((number, f"{where}: {LONE_SURROGATE}"))
            continue
        records.append(Record(str(path), number, where, value))
    return records, problems


def csv_header_problems(where: str, header: list[str]) -> list[str]:
    """What makes a header line unusable as field names: empty, repeated or space-padded names, list columns."""
    from toolkit.data.formatters import list_fields  # here: formatters imports this module

    problems, seen, list_columns = [], set(), list_fields()
    for index, name in enumerate(header, start=1):
        if not name.strip():
            problems.append(f"{where}: column {index} of the header has no name")
        elif name != name.strip():
            problems.append(f"{where}: column name {name!r} has spaces around it; remove them")
        elif name in seen:
            problems.append(f"{where}: column '{name}' appears twice in the header")
        elif name in list_columns:
            glossary = ", or name a data.glossary" if name == "terms" else ""
            problems.append(f"{where}: column '{name}' cannot be used in CSV (a cell holds text, not a list); "
                            f"write these rows as .jsonl, .json or .parquet{glossary}")
        elif any("\udc80" <= c <= "\udcff" for c in name):
            problems.append(f"{where}: the header is not valid UTF-8; save the file as UTF-8")
        seen.add(name)
    return problems


def not_utf8_column(header: list[str], cells: list[str]) -> str | None:
    """The first column whose cell held bytes that are not UTF-8 (read as surrogate escapes), or None."""
    for name, cell in zip(header, cells):
        if any("\udc80" <= c <= "\udcff" for c in cell):
            return name
    return None


def csv_records(reader) -> Iterator[tuple[int, list[str] | None, str | None]]:
    """(first line, cells, CSV error) for each record; blank lines are skipped, and a record whose quoted cell spans
    lines is named by its first line."""
    line_before = 0
    while True:
        start = line_before + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            line_before = reader.line_num
            yield start, None, str(err)
            continue
        line_before = reader.line_num
        if cells:
            yield start, cells, None


def read_csv(path: Path) -> tuple[list[Record], Problems]:
    """CSV: comma-separated, UTF-8 (a BOM is fine), the first line names the fields, quoting as in RFC 4180.

    Python's `csv` module reads it row by row, so every row keeps its line number and every cell stays text (a
    dataframe reader would guess numbers and turn empty cells into NaN). An empty cell is an empty string, which
    optional fields treat as absent. Undecodable bytes are kept as escapes while reading, so one bad row is one
    problem line instead of the end of the file.
    """
    records, problems, header = [], [], None
    with path.open("r", encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
        for start, cells, error in csv_records(csv.reader(handle, strict=True)):
            where = f"{path}:{start}"
            if error is not None:
                problems.append((start, f"{where}: not valid CSV ({error}); a cell holding a comma, quote or line "
                                        "break must be in double quotes, with quotes inside written twice"))
                if header is None:
                    return [], problems  # without its header line no row can be read
            elif header is None:
                header = cells
                header_problems = csv_header_problems(where, header)
                if header_problems:
                    return [], [(start, message) for message in header_problems]
            elif problem := csv_row_problem(header, cells):
                problems.append((start, f"{where}: {problem}"))
            else:
                records.append(Record(str(path), start, where, dict(zip(header, cells))))
    if header is not None and not records and not problems:
        problems.append((0, f"{path}: no rows below the header line"))
    return records, problems


def csv_row_problem(header: list[str], cells: list[str]) -> str | None:
    if len(cells) > len(header):
        return (f"{len(cells)} cells, but the header names {len(header)} columns (a cell holding a comma must be in "
                "double quotes)")
    if len(cells) < len(header):
        return (f"{len(cells)} cells, but the header names {len(header)} columns (an empty cell still needs its "
                "comma)")
    column = not_utf8_column(header, cells)
    if column is not None:
        return f"column '{column}' is not valid UTF-8; save the file as UTF-8"
    return None


def arrow_rows(batches, path: Path) -> tuple[list[Record], Problems]:
    """Records from Arrow batches (Parquet or a saved dataset), named `file row N`.

    A column stores a field a row does not have as null, so nulls are left out of the row: an absent optional
    field reads as absent, as in JSON Lines.
    """
    records, problems, number = [], [], 0
    try:
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                where = f"{path} row {number}"
                records.append(Record(str(path), number, where, {k: v for k, v in row.items() if v is not None}))
    except Exception as err:  # pyarrow raises its own error types for damaged data
        which = f"rows after row {number}" if number else "the rows"
        problems.append((number + 1, f"{path}: {which} cannot be read ({first_line(err)})"))
    return records, problems


def read_parquet(path: Path) -> tuple[list[Record], Problems]:
    """Parquet through pyarrow, one batch of rows at a time."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises its own error types for files that are not Parquet
        return [], [(0, f"{path}: not a readable Parquet file ({first_line(err)})")]
    with parquet:
        return arrow_rows(parquet.iter_batches(batch_size=ARROW_BATCH_ROWS), path)


def read_saved_dataset(path: Path) -> tuple[list[Record], Problems]:
    """A folder written by `Dataset.save_to_disk`, memory-mapped by `datasets.load_from_disk` and read in batches.

    A `DatasetDict` folder holds one folder per split; the error names them, so the user can point at one.
    """
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path), keep_in_memory=False)
    except FileNotFoundError as err:
        if not (path / datasets.config.DATASET_STATE_JSON_FILENAME).exists():
            return [], [(0, f"{path}: a folder, but not a dataset saved with datasets' save_to_disk (no "
                            f"{datasets.config.DATASET_STATE_JSON_FILENAME}); data files are {KINDS_TEXT}")]
        return [], [(0, f"{path}: the saved dataset cannot be read ({first_line(err)})")]
    except Exception as err:  # damaged Arrow files or metadata raise many error types
        return [], [(0, f"{path}: the saved dataset cannot be read ({first_line(err)})")]
    if isinstance(dataset, datasets.DatasetDict):
        splits = ", ".join(dataset)
        return [], [(0, f"{path}: a dataset with several splits ({splits}); point at one split's folder, e.g. "
                        f"{path / next(iter(dataset), 'train')}")]
    return arrow_rows(dataset.with_format("arrow").iter(batch_size=ARROW_BATCH_ROWS), path)


READERS = {".jsonl": read_jsonl, ".json": read_json_array, ".csv": read_csv, ".parquet": read_parquet}


def read_records(path: Path) -> tuple[list[Record], Problems]:
    """Every record of a data file (or saved-dataset folder) and every problem reading it; no rows is a problem."""
    path = Path(path)
    if path.is_dir():
        reader = read_saved_dataset
    else:
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            return [], [(0, f"{path}: unknown data file type '{path.suffix}'; use {KINDS_TEXT}")]
    try:
        records, problems = reader(path)
    except OSError as err:
        return [], [(0, f"{path}: cannot be read ({err.strerror or first_line(err)})")]
    if not records and not problems:
        problems.append((0, f"{path}: no rows (the file is empty)"))
    return records, problems


def check_exists(path_text: str, key: str) -> list[str]:
    path = Path(path_text)
    if not path.exists():
        return [f"{key}: file not found: {path} (relative paths are read from the current directory, {Path.cwd()})"]
    if not path.is_file() and not path.is_dir():
        return [f"{key}: not a file: {path}"]
    return []


@dataclass
class Chunk:
    """A slice of a data file for one worker: raw JSON Lines lines `(line number, bytes)` that the worker parses,
    or records another reader already parsed; `problems` are reading problems found while cutting it, `size` the
    bytes of the file it covers (for progress)."""

    path: Path
    lines: list[tuple[int, bytes]] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)
    problems: Problems = field(default_factory=list)
    size: int = 0

    def parsed(self) -> tuple[list[Record], Problems]:
        """The chunk's records and problems, parsing raw lines the way `read_jsonl` does."""
        records, problems = list(self.records), list(self.problems)
        for number, line_bytes in self.lines:
            record, problem = jsonl_record(self.path, number, line_bytes)
            if problem:
                problems.append(problem)
            elif record:
                records.append(record)
        return records, problems


def chunks(path: Path, rows: int) -> Iterator[Chunk]:
    """A data file in chunks of about `rows` rows, read as it is consumed.

    JSON Lines is cut into raw lines without parsing them, so parsing runs in the worker that encodes the chunk and
    at most the chunks in flight are held. The other types are read by their reader (`read_records`) and cut after.
    """
    path = Path(path)
    if not path.is_dir() and path.suffix.lower() == ".jsonl":
        yield from jsonl_chunks(path, rows)
        return
    records, problems = read_records(path)
    yield Chunk(path, problems=problems, size=0)
    for start in range(0, len(records), rows):
        yield Chunk(path, records=records[start : start + rows])


def jsonl_chunks(path: Path, rows: int) -> Iterator[Chunk]:
    try:
        handle = path.open("rb")
    except OSError as err:
        yield Chunk(path, problems=[(0, f"{path}: cannot be read ({err.strerror or first_line(err)})")])
        return
    with handle:
        chunk = Chunk(path)
        for number, line_bytes in enumerate(handle, start=1):
            chunk.lines.append((number, line_bytes))
            chunk.size += len(line_bytes)
            if len(chunk.lines) >= rows:
                yield chunk
                chunk = Chunk(path)
        yield chunk


def content_hash(path: Path) -> str:
    """A digest of a data file's bytes (a saved-dataset folder: of every file in it, with their relative paths), so
    whatever depends on a file's content can tell when it changed, whatever its name or modification time."""
    path = Path(path)
    digest = hashlib.blake2b(digest_size=20)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        name = str(file.relative_to(path)) if path.is_dir() else ""
        digest.update(f"{len(name)}:{name}:{file.stat().st_size}:".encode("utf-8", "surrogateescape"))
        with file.open("rb") as handle:
            while block := handle.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()
