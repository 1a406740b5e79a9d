"""Scoring answers: the rows an evaluation asks, their key terms, and the local metrics (term accuracy, term recall,
exact match). Used by `toolkit eval`, the retention check and the samples shown during training."""

from __future__ import annotations

from pathlib import Path

from toolkit.data import formatters, reading, sources
from toolkit.errors import ToolkitError
from toolkit.evaluation import terms

METRICS_DIR = Path(__file__).resolve().parent / "metrics"  # local evaluate scripts: no hub needed
METRIC_NAMES = ("term_accuracy", "term_recall", "exact_match")


def read_rows(paths: str | list[str], key: str, section) -> list[reading.Row]:
    """Parse and check data files, with an error that names the option or recipe key they came from."""
    rows = []
    for path in reading.file_list(paths):
        problems = sources.check_exists(path, key)
        if problems:
            raise ToolkitError(problems[0])
        file_rows, problems = reading.parse_rows(Path(path), section)
        reading.raise_problems(problems, key)
        rows += file_rows
    return rows


def eval_rows(recipe, data_file: str | None) -> tuple[list[reading.Row], str]:
    """The rows to evaluate and where they came from: --data, else the recipe's eval file or held-out split.

    The held-out split is recomputed with the recipe's seed, which gives exactly the rows training held out.
    """
    section = recipe.data
    if data_file:
        return read_rows(data_file, "--data", section), data_file
    if section.eval:
        return read_rows(section.eval, "data.eval", section), ", ".join(reading.file_list(section.eval))
    if section.eval_fraction > 0:
        from toolkit.training.prepare import held_out_rows

        where = f"{section.train} (held-out eval_fraction={section.eval_fraction:g}, seed {recipe.train.seed})"
        return held_out_rows(recipe), where
    raise ToolkitError("no eval rows: the run's recipe has no data.eval file and no data.eval_fraction; "
                       "pass --data FILE")


def glossary_for(recipe, rows: list[reading.Row]) -> list[str] | None:
    """The recipe's glossary, read only when some row has no `terms` of its own (otherwise it is never used)."""
    path = recipe.data.glossary
    if not path or all(row.fields.get("terms") is not None for row in rows):
        return None
    problems = sources.check_exists(path, "data.glossary")
    if problems:
        raise ToolkitError(problems[0])
    return reading.read_glossary(path)


def key_terms_for(recipe, rows: list[reading.Row], references: list[str]) -> list[list[str] | None]:
    """Each row's key terms: its own `terms`, else the glossary's terms in its reference answer (toolkit.evaluation.terms)."""
    glossary = glossary_for(recipe, rows)
    return [terms.key_terms({"terms": row.fields.get("terms"), "output": reference}, glossary)
            for row, reference in zip(rows, references)]


def load_metrics() -> dict:
    """The three local evaluate scripts; keep_in_memory so computing writes no Arrow cache or lock files."""
    import evaluate

    return {name: evaluate.load(str(METRICS_DIR / f"{name}.py"), keep_in_memory=True) for name in METRIC_NAMES}


def score(metrics: dict, predictions: list[str], references: list[str], key_terms: list[list[str] | None]) -> dict:
    """n_examples and the three metrics for one set of answers; term metrics are None when no row has key terms."""
    term_lists = [t or [] for t in key_terms]
    result = {"n_examples": len(predictions)}
    for name in ("term_accuracy", "term_recall"):
        result.update(metrics[name].compute(predictions=predictions, references=term_lists))
    result.update(metrics["exact_match"].compute(predictions=predictions, references=references))
    return result


def delta(tuned: dict, base: dict) -> dict:
    return {k: None if tuned[k] is None or base[k] is None else tuned[k] - base[k] for k in METRIC_NAMES}


def prediction_records(rows, section, key_terms, tuned: list[str], base: list[str] | None) -> list[dict]:
    """One record per row for eval_predictions.jsonl: what was asked, expected, answered and which terms were missed."""
    records = []
    for i, row in enumerate(rows):
        conversation = reading.conversation(row, section)
        record = {
            "question": formatters.question_text(conversation),
            **{name: row.fields.get(name) for name in formatters.PROMPT_FIELDS},
            "images": formatters.images_in(conversation),
            "reference": formatters.answer_text(conversation),
            "prediction": tuned[i],
        }
        if base is not None:
            record["base_prediction"] = base[i]
        found, missing = terms.split_terms(tuned[i], key_terms[i]) if key_terms[i] is not None else (None, None)
        record.update({"terms": key_terms[i], "terms_found": found, "terms_missing": missing})
        records.append(record)
    return records
