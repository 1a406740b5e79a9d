"""`toolkit validate --show N`: rows exactly as the trainer will see them, with the learned tokens highlighted.

Each row is decoded from the very ids and loss mask training uses (after the chat template, the pinned date and
any cut to train.max_seq_length), so what is shown is what is trained: the prompt dimmed, the tokens the loss
covers in bold green, special tokens (`<|eot_id|>`, `<|image|>`) written out. Data text is made terminal-safe.
"""

from __future__ import annotations

from rich.panel import Panel
from rich.text import Text

from toolkit.ui.report import console
from toolkit.ui.terminal import visible

PROMPT_STYLE = "dim"
LEARNED_STYLE = "bold green"


def runs_of(mask: list[int]) -> list[tuple[int, int, bool]]:
    """(start, end, learned) for each stretch of equal mask values."""
    stretches, start = [], 0
    for i in range(1, len(mask) + 1):
        if i == len(mask) or mask[i] != mask[start]:
            stretches.append((start, i, bool(mask[start])))
            start = i
    return stretches


def highlighted(example, tokenizer) -> Text:
    text = Text()
    for start, end, learned in runs_of(example.completion_mask):
        piece = tokenizer.decode(example.input_ids[start:end], skip_special_tokens=False)
        text.append(visible(piece), style=LEARNED_STYLE if learned else PROMPT_STYLE)
    return text


def caption(row, example, length_before: int, limit: int) -> str:
    where = row.where or f"{row.source}:{row.line}"
    cut = f", cut from {length_before} to {limit}" if length_before > len(example.input_ids) else ""
    images = f", {len(example.images)} image(s)" if example.images else ""
    return f"{where}: {len(example.input_ids)} tokens, {example.learned} learned{cut}{images}"


def show_rows(prepared, count: int) -> None:
    """The first `count` training rows as trained; the legend first."""
    encoding, tokenizer = prepared.train, prepared.tokenizer
    limit = prepared.recipe.train.max_seq_length
    legend = Text.assemble(("prompt (no loss)", PROMPT_STYLE), "  ", ("learned (loss)", LEARNED_STYLE))
    console.print(legend)
    for row, example, before in zip(encoding.rows[:count], encoding.examples[:count], encoding.kept_lengths[:count]):
        title = Text(visible(caption(row, example, before, limit)))
        console.print(Panel(highlighted(example, tokenizer), title=title, title_align="left"))
