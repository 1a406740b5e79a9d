"""`toolkit eval` end to end on the trained tiny run, plus the choice of eval rows."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import TERMS, tiny_recipe, write_jsonl

from toolkit import api
from toolkit.cli import main
from toolkit.data import reading
from toolkit.errors import ToolkitError
from toolkit.evaluation import terms
from toolkit.evaluation.scoring import eval_rows, glossary_for
from toolkit.runs import rundir

FAST = ["--max-new-tokens", "32"]
METRIC_KEYS = {"n_examples", "term_accuracy", "term_recall", "exact_match"}


def count_lines(path) -> int:
    return sum(1 for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip())


def read_predictions(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "eval_predictions.jsonl").read_text(encoding="utf-8").splitlines()]


def with_data(recipe, **changes):
    return recipe.model_copy(update={"data": recipe.data.model_copy(update=changes)})


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory, tiny_data) -> Path:
    """A run that learned some of its training answers: 24 steps with adapters on attention, MLP and the token
    embeddings (a random model needs the latter to learn words quickly; see recipes/quickstart.yaml)."""
    folder = tmp_path_factory.mktemp("learned")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "embed_tokens"]
    recipe = tiny_recipe(folder, tiny_data, train={"max_steps": 24, "learning_rate": 0.01, "save_steps": 100},
                         lora={"r": 16, "targets": targets})
    return api.train(recipe, folder / "run").path


def scores_of(records: list[dict], answer: str) -> dict:
    """The three metrics recomputed by hand from eval_predictions.jsonl (every row here has key terms)."""
    found = [terms.split_terms(r[answer], r["terms"])[0] for r in records]
    return {
        "n_examples": len(records),
        "term_accuracy": sum(len(f) == len(r["terms"]) for f, r in zip(found, records)) / len(records),
        "term_recall": sum(map(len, found)) / sum(len(r["terms"]) for r in records),
        "exact_match": sum(terms.normalize(r[answer]) == terms.normalize(r["reference"]) for r in records)
        / len(records),
    }


def test_compare_base_scores_the_base_with_the_adapter_off(learned_run, tiny_data):
    assert main(["eval", str(learned_run), "--data", tiny_data["train"], "--compare-base", "--max-new-tokens",
                 "24", "--batch-size", "5"]) == 0  # 12 rows: batches of 5, 5 and 2
    summary = json.loads((learned_run / "eval.json").read_text(encoding="utf-8"))
    records = read_predictions(learned_run)
    assert len(records) == count_lines(tiny_data["train"]) == 12
    assert [r["input"] for r in records] == [json.loads(line)["input"] for line in
                                             Path(tiny_data["train"]).read_text(encoding="utf-8").splitlines()]
    assert all(r["terms"] == [r["input"]] for r in records)
    assert {k: summary[k] for k in METRIC_KEYS} == scores_of(records, "prediction")
    assert summary["base"] == scores_of(records, "base_prediction")
    assert summary["delta"] == {k: summary[k] - summary["base"][k] for k in METRIC_KEYS - {"n_examples"}}
    assert summary["term_accuracy"] > summary["base"]["term_accuracy"]  # it learned; the random base did not
    assert sum(r["prediction"] != r["base_prediction"] for r in records) >= 10
    assert summary["data"] == tiny_data["train"] and summary["run_dir"] == str(learned_run)


def test_eval_limit(tiny_run, tmp_path):
    out = tmp_path / "limited.json"
    assert main(["eval", str(tiny_run), "--limit", "2", "--json", str(out), *FAST]) == 0
    summary = json.loads(out.read_text(encoding="utf-8"))
    assert summary["n_examples"] == 2 and "base" not in summary
    assert len(read_predictions(tiny_run)) == 2
    assert "base_prediction" not in read_predictions(tiny_run)[0]


def test_rows_without_terms_or_glossary_are_not_available(tiny_run, tmp_path):
    rows = [{"instruction": "다음 건설 용어를 설명하세요.", "input": t, "output": o} for t, o in TERMS.items()]
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    out = tmp_path / "plain.json"
    assert main(["eval", str(tiny_run), "--data", str(plain), "--limit", "2", "--json", str(out), *FAST]) == 0
    summary = json.loads(out.read_text(encoding="utf-8"))
    assert summary["term_accuracy"] is None and summary["term_recall"] is None
    assert isinstance(summary["exact_match"], float)
    assert read_predictions(tiny_run)[0]["terms"] is None


def test_glossary_supplies_key_terms(tiny_run, tmp_path):
    run_copy = tmp_path / "run"
    shutil.copytree(tiny_run, run_copy, ignore=shutil.ignore_patterns("checkpoint-*"))
    glossary = tmp_path / "glossary.txt"
    glossary.write_text("# construction terms\n거푸집\n콘 크리트\n타워크레인\n", encoding="utf-8")
    recipe = yaml.safe_load((run_copy / "recipe.yaml").read_text(encoding="utf-8"))
    recipe["data"]["glossary"] = str(glossary)
    (run_copy / "recipe.yaml").write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    rows = [{"instruction": "다음 건설 용어를 설명하세요.", "input": t, "output": o} for t, o in TERMS.items()]
    plain = write_jsonl(tmp_path / "plain.jsonl", rows)
    assert main(["eval", str(run_copy), "--data", str(plain), "--limit", "2", *FAST]) == 0
    summary = json.loads((run_copy / "eval.json").read_text(encoding="utf-8"))
    assert isinstance(summary["term_accuracy"], float) and isinstance(summary["term_recall"], float)
    assert [p["terms"] for p in read_predictions(run_copy)] == [["거푸집", "콘 크리트"], ["콘 크리트"]]


def test_missing_run_dir_exits_2(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nope")]) == 2
    assert capsys.readouterr().out.replace("\n", "") == f"error: run directory not found: {tmp_path / 'nope'}"


def test_missing_data_file_exits_2(tiny_run, tmp_path, capsys):
    assert main(["eval", str(tiny_run), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert capsys.readouterr().out.replace("\n", "") == (f"error: --data: file not found: {tmp_path / 'missing.jsonl'} "
                                                         f"(relative paths are read from the current directory, "
                                                         f"{Path.cwd()})")


def test_eval_fraction_reproduces_the_held_out_rows(tiny_run, tiny_data):
    recipe = with_data(rundir.open_run(tiny_run), eval=None, eval_fraction=0.25)
    rows, source = eval_rows(recipe, None)
    _, held_out = reading.load_splits(recipe.data, recipe.train.seed)
    assert [r.line for r in rows] == [r.line for r in held_out] and len(rows) == 3
    assert tiny_data["train"] in source


def test_no_eval_rows_is_a_clear_error(tiny_run):
    recipe = with_data(rundir.open_run(tiny_run), eval=None)
    with pytest.raises(ToolkitError, match="--data"):
        eval_rows(recipe, None)


def test_glossary_is_read_only_when_rows_lack_terms(tiny_run, tmp_path):
    recipe = with_data(rundir.open_run(tiny_run), glossary=str(tmp_path / "missing.txt"))
    with_terms = [reading.Row("x", 1, {"instruction": "a", "output": "b", "terms": ["b"]})]
    assert glossary_for(recipe, with_terms) is None
    with pytest.raises(ToolkitError, match="data.glossary"):
        glossary_for(recipe, [reading.Row("x", 1, {"instruction": "a", "output": "b"})])
