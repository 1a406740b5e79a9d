"""`toolkit eval RUN_DIR`: generate answers for held-out rows and measure whether they use the key terms.

The prompt is exactly the training prompt (`encode.prompt_ids`), decoding is greedy, and the metrics are the local
`evaluate` scripts in `toolkit/metrics/` (term_accuracy, term_recall, exact_match; matching rule in
`toolkit.evaluation.terms`). `--compare-base` runs the same prompts through the same loaded model with the adapter switched
off, so base and tuned differ only by the adapter. `--retention` also asks a general set with the adapter on and
off and reports the drift beside the domain gain (`toolkit.evaluation.retention`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from toolkit.commands.common import answer_length, positive_int
from toolkit.evaluation import retention, run_eval, scoring
from toolkit.ui import terminal
from toolkit.ui.report import console, show

EXAMPLES_SHOWN = 3
EXAMPLE_LINES = 4  # lines a table cell may fill; the whole text stays in eval_predictions.jsonl


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolkit eval", description="Measure term accuracy of a run.")
    parser.add_argument("run_dir", help="a finished run directory (from toolkit sft)")
    parser.add_argument("--data", metavar="FILE", help="JSON Lines rows to evaluate (default: the recipe's eval rows)")
    parser.add_argument("--compare-base", action="store_true", help="also evaluate the base model (adapter off)")
    parser.add_argument("--json", metavar="FILE", help=f"summary file (default: RUN_DIR/{run_eval.EVAL_JSON})")
    parser.add_argument("--limit", type=positive_int, metavar="N", help="evaluate only the first N rows")
    parser.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                        help="prompts per generate call (default 8)")
    parser.add_argument("--max-new-tokens", type=answer_length, default=256, metavar="N",
                        help="answer length cap (default 256)")
    parser.add_argument("--no-quantize", action="store_true",
                        help="load the base unquantized even if training quantized it")
    parser.add_argument("--retention", action="store_true",
                        help="also measure general drift, base vs tuned, on a general set (implies --compare-base)")
    parser.add_argument("--retention-data", metavar="FILE",
                        help="general rows to use instead of the shipped set (implies --retention)")
    return parser
















def cell(value, signed: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:+.3f}" if signed else f"{value:.3f}"


def show_summary(tuned: dict, base: dict | None, source: str) -> None:
    title = f"Eval: {tuned['n_examples']} rows from {source}"  # report.table shows titles as plain text
    if base is None:
        show(title, ["metric", "tuned"], [[name, cell(tuned[name])] for name in scoring.METRIC_NAMES])
        return
    change = scoring.delta(tuned, base)
    rows = [[name, cell(base[name]), cell(tuned[name]), cell(change[name], signed=True)] for name in scoring.METRIC_NAMES]
    show(title, ["metric", "base", "tuned", "Δ"], rows)


def show_drift(domain: dict, base: dict, kept: retention.Retention, notes: list[str]) -> None:
    """Domain gain and general drift in one table, then one warning line per recipe threshold crossed."""
    general_change = kept.delta["term_accuracy"]
    rows = [
        [f"domain term_accuracy ({domain['n_examples']} rows)", cell(base["term_accuracy"]),
         cell(domain["term_accuracy"]), cell(scoring.delta(domain, base)["term_accuracy"], signed=True)],
        [f"general term_accuracy ({kept.n_examples} rows)", cell(kept.base["term_accuracy"]),
         cell(kept.tuned["term_accuracy"]), cell(general_change, signed=True)],
        [f"general KL(tuned||base)/token ({kept.answer_tokens})", "", "",
         f"{kept.kl_per_token:.4f}"],
        ["general answers changed", "", "", f"{kept.changed_share:.3f}"],
    ]
    show(f"Domain gain and general drift ({kept.source})", ["measure", "base", "tuned", "change"], rows)
    if kept.skipped_images:
        console.print(f"note: {kept.skipped_images} general rows with images left out: the model reads no images")
    for line in notes:
        console.print(f"[yellow]warning:[/] {line}", soft_wrap=True, markup=True, highlight=False)


def column_width(columns: int) -> int:
    """Cells per column when `columns` equal columns fill the console (rich adds 3 per column and 1 of borders)."""
    return max(8, (console.width - 3 * columns - 1) // columns)


def clip(text: str | None, width: int):
    """Data text as a table cell: on one line with terminal controls escaped (`toolkit.ui.terminal.one_line`), then
    cut to EXAMPLE_LINES lines of `width` cells, the last ending in `…` when something was cut."""
    from rich.text import Text

    cell = Text(terminal.one_line(text or ""))
    lines = cell.wrap(console, width, overflow="fold")
    if len(lines) <= EXAMPLE_LINES:
        return cell
    kept = lines[:EXAMPLE_LINES]
    kept[-1].truncate(width - 1)
    kept[-1].rstrip()  # also the space rich pads with where a wide character did not fit
    kept[-1].append("…")
    return Text("\n").join(kept)


def show_examples(records: list[dict], compare: bool) -> None:
    """A few rows side by side, so a number in the summary can be checked against real answers."""
    from rich.table import Table

    table = Table(title="Examples", title_justify="left", show_lines=True)
    columns = ["input", "reference", "tuned"] + (["base"] if compare else []) + ["missing terms"]
    width = column_width(len(columns))
    for name in columns:
        table.add_column(name, width=width, overflow="fold")
    for record in records[:EXAMPLES_SHOWN]:
        missing = "n/a" if record["terms_missing"] is None else ", ".join(record["terms_missing"]) or "-"
        values = [record["input"] or record["instruction"] or record["question"], record["reference"], record["prediction"]]
        values += [record["base_prediction"]] if compare else []
        table.add_row(*[clip(value, width) for value in values + [missing]])
    console.print(table)








def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    json_path = Path(args.json) if args.json else run_dir / run_eval.EVAL_JSON
    result = run_eval.evaluate(run_dir, args.data, compare_base=args.compare_base, limit=args.limit,
                               batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                               quantize=not args.no_quantize, retention_check=args.retention,
                               retention_data=args.retention_data,
                               before_loading=lambda: run_eval.check_outputs(run_dir, json_path))
    summary, base = result.summary, result.summary.get("base")
    show_summary(summary, base, summary["data"])
    if summary["term_accuracy"] is None:
        console.print("term metrics n/a: the rows have no 'terms' and the recipe names no data.glossary "
                      "(or no glossary term occurs in the references)")
    show_examples(result.records, base is not None)
    changed = summary.get("data_changed_since_training")
    if changed:
        console.print(f"[yellow]warning:[/] {', '.join(changed)} changed since this run was trained (its digest in "
                      f"started.json differs): these are today's rows"
                      + (", and the held-out share may include rows the run trained on" if "data.train" in changed
                         else ""), soft_wrap=True)
    if result.drift is not None:
        show_drift(summary, base, result.drift, result.warnings)
    written = result.write(json_path, run_dir)
    console.print(f"Wrote {', '.join(map(str, written))}", markup=False, soft_wrap=True)
    return 0
