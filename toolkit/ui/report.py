"""Terminal output (rich tables, progress) and the JSON files every result is also written to."""

from __future__ import annotations

import json
import math
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from rich.text import Text

from toolkit.training.distributed import is_main_process
from toolkit.ui.terminal import visible

console = Console(highlight=False, quiet=not is_main_process())  # one voice when several processes train


def table(title: str, columns: list[str], rows: list[list]) -> Table:
    """A rich table whose cells are plain text: a path or data text holding `[bold]` or escape sequences is shown,
    never interpreted."""
    out = Table(title=Text(visible(title)), title_justify="left")
    for i, name in enumerate(columns):
        out.add_column(Text(visible(name)), justify="left" if i == 0 else "right")
    for row in rows:
        out.add_row(*[Text(visible(format_cell(v))) for v in row])
    return out


def format_cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def show(title: str, columns: list[str], rows: list[list]) -> None:
    console.print(table(title, columns, rows))


def strict_json_value(value):
    """NaN and inf become null: strict JSON readers reject the bare `NaN` Python's json module writes."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: strict_json_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json_value(item) for item in value]
    return value


def write_json(path: Path, data) -> None:
    """Strict JSON, written through a temporary sibling so a crash never leaves half a file."""
    from toolkit.io.files import write_text_atomic

    text = json.dumps(strict_json_value(data), indent=2, ensure_ascii=False, allow_nan=False)
    write_text_atomic(Path(path), text + "\n")


def progress_bar(description: str = "") -> Progress:
    """One progress style for all long work: label, bar, done/total, elapsed and remaining time."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
        console=console,
        transient=False,
    )
