"""`toolkit eval RUN_DIR`: generate answers for held-out rows and measure whether they use the key terms.

The prompt is exactly the training prompt (`encode.prompt_ids`), decoding is greedy, and the metrics are the local
`evaluate` scripts in `toolkit/metrics/` (term_accuracy, term_recall, exact_match; matching rule in
`toolkit.evaluation.terms`). `--compare-base` runs the same prompts through the same loaded model with the adapter switched
off, so base and tuned differ only by the adapter. `--retention` also asks a general set with the adapter on and
off and reports the drift beside the domain gain (`toolkit.evaluation.retention`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from toolkit.commands.common import answer_length, positive_int
from toolkit.data import encode, reading
from toolkit.errors import ToolkitError
from toolkit.evaluation import generation, retention, scoring
from toolkit.io import files
from toolkit.model import loading
from toolkit.runs import rundir
from toolkit.ui import terminal
from toolkit.ui.report import console, show, write_json

EVAL_JSON = "eval.json"
PREDICTIONS_FILE = "eval_predictions.jsonl"
RETENTION_FILE = "retention_predictions.jsonl"
EXAMPLES_SHOWN = 3
EXAMPLE_LINES = 4  # lines a table cell may fill; the whole text stays in eval_predictions.jsonl


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolkit eval", description="Measure term accuracy of a run.")
    parser.add_argument("run_dir", help="a finished run directory (from toolkit sft)")
    parser.add_argument("--data", metavar="FILE", help="JSON Lines rows to evaluate (default: the recipe's eval rows)")
    parser.add_argument("--compare-base", action="store_true", help="also evaluate the base model (adapter off)")
    parser.add_argument("--json", metavar="FILE", help=f"summary file (default: RUN_DIR/{EVAL_JSON})")
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


def general_set(recipe, args) -> retention.GeneralSet | None:
    """The general rows for --retention, checked before any model loads (None without --retention)."""
    if args.retention_data is not None and not args.retention_data.strip():
        raise ToolkitError("--retention-data is empty; name a general data file, or use --retention for the "
                           "shipped set")
    if not (args.retention or args.retention_data):
        return None
    path, key = args.retention_data, "--retention-data"
    if path is None and recipe.retention.data is not None:
        path, key = recipe.retention.data, "retention.data"
    reads_images = loading.is_vision_config(loading.load_config(recipe.model.name, recipe.model.revision))
    return retention.load_general_set(recipe.data, path, key, reads_images=reads_images)


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




def write_predictions(path: Path, records: list[dict]) -> None:
    files.write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def check_outputs(run_dir: Path, json_path: Path) -> None:
    """Fail before the slow part if the results could not be written: a writable run directory, and a summary
    path in a writable folder that is new or an earlier eval summary (a user's own file is never replaced)."""
    if not files.writable(run_dir):
        raise ToolkitError(f"cannot write {PREDICTIONS_FILE} into {run_dir}: the directory is not writable")
    if json_path.is_dir():
        raise ToolkitError(f"cannot write the summary to {json_path}: it is a directory; give --json a file name, "
                           f"e.g. {json_path / EVAL_JSON}")
    if json_path.exists():
        try:
            earlier = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            earlier = None
        if not (isinstance(earlier, dict) and {"n_examples", "run_dir"} <= earlier.keys()):
            raise ToolkitError(f"--json {json_path} exists and is not an eval summary; eval only replaces its own. "
                               "Choose another file")
    if not json_path.parent.is_dir():
        raise ToolkitError(f"--json: folder {json_path.parent} does not exist")
    if not files.writable(json_path.parent):
        raise ToolkitError(f"cannot write the summary to {json_path}: folder {json_path.parent} is not writable; "
                           "choose another --json")


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise ToolkitError(f"run directory not found: {run_dir}")
    recipe = rundir.open_run(run_dir)
    rows, source = scoring.eval_rows(recipe, args.data)
    rows = rows[: args.limit] if args.limit else rows
    references = [reading.reference(row, recipe.data) for row in rows]
    key_terms = scoring.key_terms_for(recipe, rows, references)
    json_path = Path(args.json) if args.json else run_dir / EVAL_JSON
    general = general_set(recipe, args)
    check_outputs(run_dir, json_path)
    metrics = scoring.load_metrics()

    model, tokenizer, recipe = rundir.load_trained(run_dir, quantize=not args.no_quantize)
    prompts = [encode.prompt(row, recipe.data, tokenizer) for row in rows]
    with_images = any(p.images for p in prompts) or (general is not None and general.image_rows > 0)
    images = rundir.image_inputs(recipe, tokenizer) if with_images else None
    settings = (tokenizer, prompts, args.batch_size, args.max_new_tokens)
    tuned_answers = generation.generate_answers(model, *settings, label="tuned", images=images)
    base_answers = None
    if args.compare_base or general is not None:
        with model.disable_adapter():
            base_answers = generation.generate_answers(model, *settings, label="base", images=images)

    summary = scoring.score(metrics, tuned_answers, references, key_terms)
    base = scoring.score(metrics, base_answers, references, key_terms) if base_answers is not None else None
    show_summary(summary, base, source)
    if summary["term_accuracy"] is None:
        console.print("term metrics n/a: the rows have no 'terms' and the recipe names no data.glossary "
                      "(or no glossary term occurs in the references)")
    records = scoring.prediction_records(rows, recipe.data, key_terms, tuned_answers, base_answers)
    show_examples(records, base is not None)
    kept = notes = None
    if general is not None:
        kept = retention.measure(model, tokenizer, general, images=images, batch_size=args.batch_size,
                                 max_new_tokens=min(args.max_new_tokens, retention.ANSWER_TOKENS), metrics=metrics)
        notes = retention.warnings(kept, recipe.retention)
        show_drift(summary, base, kept, notes)

    if base is not None:
        summary["base"] = base
        summary["delta"] = scoring.delta(summary, base)
    summary.update({"data": source, "run_dir": str(run_dir)})
    written = [json_path, run_dir / PREDICTIONS_FILE]
    if kept is not None:
        summary["retention"] = {**kept.summary(), "max_kl": recipe.retention.max_kl,
                                "max_accuracy_drop": recipe.retention.max_accuracy_drop, "warnings": notes}
        write_predictions(run_dir / RETENTION_FILE, kept.records)
        written.append(run_dir / RETENTION_FILE)
    write_json(json_path, summary)
    write_predictions(run_dir / PREDICTIONS_FILE, records)
    console.print(f"Wrote {', '.join(map(str, written))}", markup=False, soft_wrap=True)
    return 0
