"""Reading data rows, checking them before any model is touched, and splitting off the held-out rows.

Files are read by `toolkit.data.sources`; here each record is checked against its format's rules (the token ids come
from `toolkit.data.encode`). Every problem in
every file is collected and reported at once as `file:line: field: what is wrong`, so a user fixes a file in one
pass instead of one crash at a time.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.data import formatters, sources, vision
from toolkit.data.formatters import FORMATTERS
from toolkit.data.sources import json_type_name
from toolkit.errors import ToolkitError

MAX_PROBLEMS_SHOWN = 25


@dataclass(frozen=True)
class Row:
    """One checked data row and where it came from, so later problems (e.g. too long) can still point at it."""

    source: str
    line: int
    fields: dict
    where: str = ""
    text: str | None = field(default=None, compare=False, repr=False)  # `fields` as JSON text, when read as such


def image_base(source: str, data_section) -> Path:
    """Where a row's relative image paths start: data.image_root, else the folder of the row's data file."""
    if data_section.image_root:
        return Path(data_section.image_root).expanduser()
    return Path(source).parent


def resolve_images(messages: list[dict], source: str, data_section) -> list[dict]:
    """The conversation with every image path made absolute (`~` expanded, relative to `image_base`)."""
    if all(isinstance(m["content"], str) for m in messages):
        return messages  # no image parts: nothing to resolve
    base = image_base(source, data_section)

    def resolved(part: dict) -> dict:
        if part.get("type") != "image":
            return part
        path = Path(part["image"]).expanduser()
        return {"type": "image", "image": str(path if path.is_absolute() else base / path)}

    return [m if isinstance(m["content"], str) else {**m, "content": [resolved(p) for p in m["content"]]}
            for m in messages]


def conversation(row: Row, data_section) -> list[dict]:
    """A row as the formatter turns it into messages (the answer last), image paths resolved."""
    messages = FORMATTERS[data_section.formatter].to_conversation(row.fields, data_section.system_prompt)
    return resolve_images(messages, row.source, data_section)


class ImageChecks:
    """Each image file is opened and checked once, however many rows name it."""

    def __init__(self):
        self.problems: dict[str, str | None] = {}

    def problem(self, path: str) -> str | None:
        if path not in self.problems:
            self.problems[path] = vision.image_problem(Path(path))
        return self.problems[path]


def image_row_problems(messages: list[dict], images: ImageChecks) -> list[str]:
    paths = formatters.images_in(messages)
    problems = [f"image: {problem}" for path in dict.fromkeys(paths) if (problem := images.problem(path))]
    if paths and any(m["role"] == "system" for m in messages):
        problems.append("a row with an image cannot have a system prompt (Llama 3.2 Vision's template refuses "
                        "it); drop data.system_prompt or the row's system turn")
    return problems


def row_problems(row: Row, data_section, images: ImageChecks) -> list[str]:
    """What is wrong with one parsed row for this recipe's formatter (empty when it is fine)."""
    fields = row.fields
    problems = FORMATTERS[data_section.formatter].problems(fields)
    terms = fields.get("terms")
    if terms is not None and not (isinstance(terms, list) and all(isinstance(t, str) and t.strip() for t in terms)):
        problems.append("field 'terms' must be a list of non-empty strings")
    if not problems:
        problems += image_row_problems(conversation(row, data_section), images)
    return problems


def check_records(records, data_section, images: ImageChecks) -> tuple[list[Row], list[tuple[int, str]]]:
    """The good rows of these records and (number, message) for every problem."""
    rows, problems = [], []
    for record in records:
        if not isinstance(record.value, dict):
            problems.append((record.number, f"{record.where}: expected a JSON object, got "
                                            f"{json_type_name(record.value)}"))
            continue
        row = Row(record.source, record.number, record.value, record.where, record.text)
        row_issues = row_problems(row, data_section, images)
        problems.extend((record.number, f"{record.where}: {issue}") for issue in row_issues)
        if not row_issues:
            rows.append(row)
    return rows, problems


def parse_rows(path: Path, data_section, images: ImageChecks | None = None) -> tuple[list[Row], list[str]]:
    """Read and check a data file. Returns the good rows and every problem found (each named by its place)."""
    records, problems = sources.read_records(path)
    rows, row_problems_ = check_records(records, data_section, images or ImageChecks())
    problems += row_problems_
    return rows, [message for _, message in sorted(problems, key=lambda item: item[0])]


def file_list(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def raise_problems(problems: list[str], what: str) -> None:
    if not problems:
        return
    shown = "\n".join(f"  {p}" for p in problems[:MAX_PROBLEMS_SHOWN])
    more = len(problems) - MAX_PROBLEMS_SHOWN
    tail = f"\n  ... and {more} more" if more > 0 else ""
    raise ToolkitError(f"{what}: {len(problems)} problem(s):\n{shown}{tail}")


def named_files(data_section) -> list[tuple[str, str]]:
    return [("data.train", p) for p in file_list(data_section.train)] + \
        [("data.eval", p) for p in file_list(data_section.eval)]


def check_files(data_section) -> None:
    """Every data file (and the glossary) exists: one error naming all that do not."""
    checks = named_files(data_section) + ([("data.glossary", data_section.glossary)] if data_section.glossary else [])
    raise_problems([p for key, path in checks for p in sources.check_exists(path, key)], "data")


def load_splits(data_section, seed: int) -> tuple[list[Row], list[Row]]:
    """Read and check train (and eval) rows from every file; split off eval_fraction when no eval file is given."""
    named = named_files(data_section)
    check_files(data_section)
    images = ImageChecks()
    train: list[Row] = []
    eval_rows: list[Row] = []
    problems: list[str] = []
    for key, path in named:
        rows, file_problems = parse_rows(Path(path), data_section, images)
        (train if key == "data.train" else eval_rows).extend(rows)
        problems += file_problems
    raise_problems(problems, "data")
    if data_section.eval_fraction > 0:
        train, eval_rows = split_rows(train, data_section.eval_fraction, seed)
    return train, eval_rows


def held_out(n_rows: int, fraction: float, seed: int) -> list[int]:
    """The indices of the rows held out for eval: deterministic, the same seed and row count give the same rows."""
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(n_rows * fraction))
    if n_eval >= n_rows:
        raise ToolkitError(f"data.eval_fraction={fraction} leaves no training rows out of {n_rows}")
    return sorted(order[:n_eval])


def split_rows(rows: list[Row], fraction: float, seed: int) -> tuple[list[Row], list[Row]]:
    """Deterministic hold-out: the same seed and rows always give the same split."""
    held = set(held_out(len(rows), fraction, seed))
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


def prompt_messages(row: Row, data_section) -> list[dict]:
    """The conversation up to where the assistant's (last) answer starts, for generation."""
    messages = conversation(row, data_section)
    return messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages


def reference(row: Row, data_section) -> str:
    """The answer a row expects (the last assistant turn's text)."""
    return formatters.answer_text(conversation(row, data_section))


def read_glossary(path: str) -> list[str]:
    """Key terms, one per line; `#` starts a comment line."""
    try:
        lines = Path(path).read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as err:
        raise ToolkitError(f"data.glossary {path}: not UTF-8 text (byte {err.start + 1}); save it as UTF-8") from None
    except OSError as err:
        raise ToolkitError(f"data.glossary {path}: cannot be read ({err.strerror})") from None
    return [t.strip() for t in lines if t.strip() and not t.lstrip().startswith("#")]
