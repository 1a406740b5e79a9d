"""Evaluating a run: its eval rows (or others) answered greedily by the tuned model, and by the base with the adapter
switched off (the same loaded model, so the two differ only by the adapter), scored by key terms; optionally the
retention check on general rows. `toolkit eval` is this plus its arguments and printing."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from toolkit.data import encode, reading
from toolkit.errors import ToolkitError
from toolkit.evaluation import generation, retention, scoring
from toolkit.io import files
from toolkit.model import loading
from toolkit.runs import rundir
from toolkit.ui.report import write_json

EVAL_JSON = "eval.json"


PREDICTIONS_FILE = "eval_predictions.jsonl"


RETENTION_FILE = "retention_predictions.jsonl"


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


@dataclass
class Evaluation:
    """What `evaluate` measured: `summary` is eval.json's content (the tuned model's metrics, and with the base
    compared `base` and `delta`, with retention `retention`), `records` one entry per row for
    eval_predictions.jsonl, `drift` the retention check's measurement (None without it)."""

    summary: dict
    records: list[dict]
    drift: retention.Retention | None = None
    warnings: list[str] | None = None

    def write(self, json_path: Path, run_dir: Path) -> list[Path]:
        """Write the summary, the predictions (and the retention predictions); returns the files written."""
        written = [json_path, run_dir / PREDICTIONS_FILE]
        if self.drift is not None:
            write_predictions(run_dir / RETENTION_FILE, self.drift.records)
            written.append(run_dir / RETENTION_FILE)
        write_json(json_path, self.summary)
        write_predictions(run_dir / PREDICTIONS_FILE, self.records)
        return written


def evaluate(run_dir: Path, data: str | None = None, *, compare_base: bool = False, limit: int | None = None,
             batch_size: int = 8, max_new_tokens: int = 256, quantize: bool = True, retention_check: bool = False,
             retention_data: str | None = None, before_loading=None) -> Evaluation:
    """Answer and score a run's eval rows (`data`: other rows, a file or a list of files). `retention_check` (or
    `retention_data`, a general data file) adds the retention check, which implies comparing with the base.
    `before_loading` is called once the rows are read and checked, before any model loads (the command checks
    there that its files can be written)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ToolkitError(f"run directory not found: {run_dir}")
    recipe = rundir.open_run(run_dir)
    rows, source = scoring.eval_rows(recipe, data)
    rows = rows[:limit] if limit else rows
    references = [reading.reference(row, recipe.data) for row in rows]
    key_terms = scoring.key_terms_for(recipe, rows, references)
    general = general_set(recipe, retention_check, retention_data)
    if before_loading is not None:
        before_loading()
    metrics = scoring.load_metrics()

    model, tokenizer, recipe = rundir.load_trained(run_dir, quantize=quantize)
    prompts = [encode.prompt(row, recipe.data, tokenizer) for row in rows]
    with_images = any(p.images for p in prompts) or (general is not None and general.image_rows > 0)
    images = rundir.image_inputs(recipe, tokenizer) if with_images else None
    settings = (tokenizer, prompts, batch_size, max_new_tokens)
    tuned_answers = generation.generate_answers(model, *settings, label="tuned", images=images)
    base_answers = None
    if compare_base or general is not None:
        with model.disable_adapter():
            base_answers = generation.generate_answers(model, *settings, label="base", images=images)

    summary = scoring.score(metrics, tuned_answers, references, key_terms)
    base = scoring.score(metrics, base_answers, references, key_terms) if base_answers is not None else None
    records = scoring.prediction_records(rows, recipe.data, key_terms, tuned_answers, base_answers)
    drift = notes = None
    if general is not None:
        drift = retention.measure(model, tokenizer, general, images=images, batch_size=batch_size,
                                  max_new_tokens=min(max_new_tokens, retention.ANSWER_TOKENS), metrics=metrics)
        notes = retention.warnings(drift, recipe.retention)
    if base is not None:
        summary["base"] = base
        summary["delta"] = scoring.delta(summary, base)
    summary.update({"data": source, "run_dir": str(run_dir)})
    if data is None:
        summary["data_changed_since_training"] = data_changed(run_dir, recipe)
    if drift is not None:
        summary["retention"] = {**drift.summary(), "max_kl": recipe.retention.max_kl,
                                "max_accuracy_drop": recipe.retention.max_accuracy_drop, "warnings": notes}
    return Evaluation(summary, records, drift, notes)


def general_set(recipe, retention_check: bool, retention_data: str | None) -> retention.GeneralSet | None:
    """The general rows of the retention check, checked before any model loads (None without the check):
    `retention_data`, else the recipe's `retention.data`, else the shipped set."""
    if retention_data is not None and not retention_data.strip():
        raise ToolkitError("--retention-data is empty; name a general data file, or use --retention for the "
                           "shipped set")
    if not (retention_check or retention_data):
        return None
    path, key = retention_data, "--retention-data"
    if path is None and recipe.retention.data is not None:
        path, key = recipe.retention.data, "retention.data"
    reads_images = loading.is_vision_config(loading.load_config(recipe.model.name, recipe.model.revision))
    return retention.load_general_set(recipe.data, path, key, reads_images=reads_images)


def data_changed(run_dir: Path, recipe) -> list[str] | None:
    """The recipe data files the eval rows came from that changed since the run was trained (None: the run does not
    record them). With data.eval the rows are that file's; without it they are the held-out share of data.train."""
    from toolkit.runs import resume

    return resume.changed_since_start(run_dir, ("data.eval",) if recipe.data.eval else ("data.train",))
