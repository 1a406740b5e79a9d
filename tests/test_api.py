"""The Python API (toolkit.api): the verbs the commands run, called from Python on the built-in model."""

from __future__ import annotations

import json

import pytest
from conftest import tiny_recipe

from toolkit import api
from toolkit.cli import main
from toolkit.config.recipe import load_recipe
from toolkit.errors import ToolkitError

FAST = {"max_new_tokens": 4, "batch_size": 4}


def test_a_run_trained_from_python_is_the_run_sft_writes(tiny_run):
    """`tiny_run` (conftest) is trained by `api.train`: the run it returns is complete and as the recipe says."""
    run = api.Run.open(tiny_run)
    assert tiny_run.name == "out" and run.path == tiny_run  # the run directory asked for and run.recipe.train.max_steps == 12
    assert run.summary["steps"] == 12 and run.summary["train_rows"] == 12 and run.summary["eval_rows"] == 6
    assert main(["extract", str(tiny_run), "--output", str(tiny_run.parent / "a.safetensors")]) == 0


def files_of(folder):
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_evaluate_from_python_gives_the_commands_numbers_and_writes_nothing(tiny_run, tmp_path):
    before = files_of(tiny_run)
    result = api.evaluate(api.Run.open(tiny_run), compare_base=True, limit=3, **FAST)
    assert files_of(tiny_run) == before  # the command writes eval_predictions.jsonl; the API leaves that to .write
    assert result.summary["n_examples"] == 3 and len(result.records) == 3
    assert set(result.summary["base"]) >= {"term_accuracy", "term_recall", "exact_match"}
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_run), "--compare-base", "--limit", "3", "--max-new-tokens", "4",
                 "--batch-size", "4", "--json", str(out)]) == 0
    command = json.loads(out.read_text(encoding="utf-8"))
    assert command == json.loads(json.dumps(result.summary))  # greedy: the same answers, the same numbers


def test_train_refuses_a_folder_the_toolkit_did_not_make(tmp_path, tiny_data):
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(ToolkitError, match=f"run directory {theirs} is not empty; pass --overwrite to replace it"):
        api.train(tiny_recipe(tmp_path, tiny_data), theirs)
    assert (theirs / "notes.txt").read_text(encoding="utf-8") == "mine"
    assert sorted(p.name for p in theirs.iterdir()) == ["notes.txt"]


def test_open_refuses_a_folder_that_is_not_a_finished_run(tmp_path):
    with pytest.raises(ToolkitError, match="is not a finished run directory"):
        api.Run.open(tmp_path)


def test_the_readmes_python_example_runs(tiny_run, monkeypatch, capsys):
    """README's "From Python" block, as written, with training replaced by the session's tiny run (the quickstart's
    420 steps are `toolkit sft`'s to test) and eval capped to a few short answers."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    block = readme.split("## From Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    trained = []
    monkeypatch.setattr(api, "train", lambda recipe, run_dir: trained.append((recipe, run_dir)) or
                        api.Run.open(tiny_run))
    evaluate = api.evaluate
    monkeypatch.setattr(api, "evaluate", lambda run, **options: evaluate(run, limit=2, **FAST, **options))
    exec(compile(block, "README.md", "exec"), {})
    assert trained == [("recipes/quickstart.yaml", "runs/quickstart")]
    base, tuned = capsys.readouterr().out.strip().splitlines()[-1].split(" -> ")
    assert 0 <= float(base) <= 1 and 0 <= float(tuned) <= 1


def test_eval_says_when_its_rows_file_changed_since_training(tiny_run, tmp_path, capsys):
    """started.json keeps the digest of every data file the run read; eval compares the file its rows come from
    (data.eval here; data.train for a held-out share) and says so when it differs."""
    import shutil

    assert api.evaluate(tiny_run, limit=1, **FAST).summary["data_changed_since_training"] == []
    copy = tmp_path / "run"
    shutil.copytree(tiny_run, copy)
    started = json.loads((copy / "started.json").read_text(encoding="utf-8"))
    started["started"]["contents"]["data.eval"] = ["0" * 64]  # as if the eval file had other bytes at training
    (copy / "started.json").write_text(json.dumps(started), encoding="utf-8")
    capsys.readouterr()
    assert main(["eval", str(copy), "--limit", "1", "--max-new-tokens", "2", "--json", str(tmp_path / "e.json")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "warning: data.eval changed since this run was trained (its digest in started.json differs): these are " \
           "today's rows" in out
    assert json.loads((tmp_path / "e.json").read_text(encoding="utf-8"))["data_changed_since_training"] == ["data.eval"]
    (copy / "started.json").unlink()  # a run an earlier toolkit started: nothing to compare with
    assert api.evaluate(copy, limit=1, **FAST).summary["data_changed_since_training"] is None


def test_a_plan_cannot_be_changed_in_place(tmp_path, tiny_data):
    import dataclasses

    from toolkit.training import memory
    from toolkit.training.prepare import prepare

    recipe_file = tiny_recipe(tmp_path, tiny_data, train={"batch_size": "auto"})
    checked = prepare(load_recipe(str(recipe_file)))
    resolved, _ = memory.memory_plan(checked)  # auto resolved into a new plan, not written into the one given
    assert checked.recipe.train.batch_size == "auto" and resolved.recipe.train.batch_size == 12
    plan = api.plan(recipe_file)
    assert plan.recipe == resolved.recipe
    for name, value in (("recipe", None), ("lora_modules", ()), ("image_spec", None)):
        with pytest.raises(dataclasses.FrozenInstanceError, match=f"cannot assign to field '{name}'"):
            setattr(plan, name, value)
    with pytest.raises(TypeError, match="does not support item assignment"):
        plan.image_tiles["a.png"] = 1
    assert len(plan.lora_modules) == 16 and all(isinstance(m, str) for m in plan.lora_modules)


def test_training_a_plan_leaves_the_plan_as_it_was(tmp_path, tiny_data):
    """api.train writes the run directory it is given into its own copy of the plan, and the trainer's module list
    into the run, never into the plan a notebook keeps."""
    plan = api.plan(tiny_recipe(tmp_path, tiny_data, train={"max_steps": 2, "save_steps": 100}))
    recipe, modules = plan.recipe, plan.lora_modules
    run = api.train(plan, tmp_path / "elsewhere")
    assert plan.recipe is recipe and plan.recipe.output_dir == "runs/recipe" and plan.lora_modules is modules
    assert run.path == tmp_path / "elsewhere" and run.recipe.output_dir == str(tmp_path / "elsewhere")
    assert run.summary["steps"] == 2 and run.summary["lora_modules"] == 16
