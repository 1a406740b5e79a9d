"""The recipe schema: every shipped recipe validates, and mistakes are errors that name their key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from toolkit.config.recipe import load_recipe, recipe_from_dict, save_recipe
from toolkit.errors import ToolkitError

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(ROOT.joinpath("recipes").glob("*.yaml"))
MINIMAL = {"model": {"name": "builtin:tiny-mllama"}, "data": {"train": "train.jsonl"}}


def problems(data: dict) -> str:
    with pytest.raises(ToolkitError) as err:
        recipe_from_dict(data)
    return str(err.value)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates_names_its_command_and_its_files_exist(path):
    recipe = load_recipe(path)
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith("# toolkit ") and path.name in first_line
    named = [recipe.data.train, recipe.data.eval, recipe.data.glossary]
    files = [name for entry in named if entry for name in ([entry] if isinstance(entry, str) else entry)]
    assert files and [name for name in files if not (ROOT / name).is_file()] == []
    assert recipe.output_dir == f"runs/{path.stem}"


def test_unknown_key_names_path_valid_keys_and_suggestion():
    message = problems({**MINIMAL, "train": {"lerning_rate": 1e-4}})
    assert "train.lerning_rate: unknown key (did you mean 'learning_rate'?)" in message
    assert "valid keys here: epochs, max_steps" in message


def test_closed_choice_lists_the_valid_ones():
    message = problems({**MINIMAL, "quantization": {"mode": "int8"}})
    assert "quantization.mode: 'int8' is not allowed; choose one of: 'none', '8bit' or '4bit'" in message


def test_every_problem_is_reported_at_once():
    message = problems({"model": {"nam": "x"}, "data": {"train": "t", "formatter": "alpacca"}, "lora": {"r": "a"}})
    assert "has 4 problem(s)" in message
    assert "model.nam: unknown key" in message
    assert "model.name: required key is missing" in message
    assert "data.formatter: unknown formatter 'alpacca'; choose one of: alpaca" in message
    assert "lora.r: Input should be a valid integer" in message


def test_eval_file_and_fraction_cannot_be_combined():
    message = problems({**MINIMAL, "data": {"train": "t", "eval": "e", "eval_fraction": 0.1}})
    assert "data.eval and data.eval_fraction cannot be used together" in message


def test_set_overrides_keep_yaml_types(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL), encoding="utf-8")
    recipe = load_recipe(path, ["train.max_steps=5", "train.gradient_checkpointing=true",
                                "lora.targets=[q_proj,v_proj]", "data.train=other.jsonl"])
    assert recipe.train.max_steps == 5
    assert recipe.train.gradient_checkpointing is True
    assert recipe.lora.targets == ["q_proj", "v_proj"]
    assert recipe.data.train == "other.jsonl"
    assert recipe.output_dir == "runs/r"


def test_set_with_unknown_key_is_an_error(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL), encoding="utf-8")
    with pytest.raises(ToolkitError, match="train.max_step: unknown key"):
        load_recipe(path, ["train.max_step=5"])
    with pytest.raises(ToolkitError, match="--set expects KEY=VALUE"):
        load_recipe(path, ["train.max_steps"])


def test_resolved_recipe_round_trips(tmp_path):
    recipe = recipe_from_dict({**MINIMAL, "output_dir": "runs/x"})
    save_recipe(recipe, tmp_path / "recipe.yaml")
    again = load_recipe(tmp_path / "recipe.yaml")
    assert again == recipe
    saved = yaml.safe_load((tmp_path / "recipe.yaml").read_text(encoding="utf-8"))
    assert saved["train"]["learning_rate"] == 2e-4  # defaults are spelled out in the run directory


def test_readme_documents_every_recipe_key():
    from toolkit.config.recipe import Recipe

    readme = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text(encoding="utf-8")
    missing = []
    for section, field in Recipe.model_fields.items():
        assert f"`{section}`" in readme, section
        model = field.annotation if isinstance(field.annotation, type) else None
        for key in getattr(model, "model_fields", {}):
            if f"`{key}`" not in readme:
                missing.append(f"{section}.{key}")
    assert missing == []


@pytest.mark.parametrize("section, values, message", [
    ("train", {"learning_rate": float("inf")}, "train.learning_rate: Input should be a finite number"),
    ("train", {"learning_rate": float("nan")}, "train.learning_rate: Input should be a finite number"),
    ("train", {"epochs": float("inf")}, "train.epochs: Input should be a finite number"),
    ("lora", {"alpha": float("inf")}, "lora.alpha: Input should be a finite number"),
    ("train", {"max_steps": 1e30},
     "train.max_steps: Unable to parse input string as an integer, exceeded maximum size"),
    ("train", {"max_steps": 10**30}, "train.max_steps: Input should be less than or equal to 100000000"),
    ("train", {"seed": -1}, "train.seed: Input should be greater than or equal to 0"),
    ("train", {"seed": 2**64}, "train.seed: Input should be less than or equal to 4294967295"),
    ("train", {"optim": "adamw_torh"}, "train.optim: unknown optimizer 'adamw_torh' (did you mean 'adamw_torch'?); "
                                       "common ones: adamw_torch, adamw_torch_fused, adamw_8bit, paged_adamw_8bit, "
                                       "adafactor, sgd"),
    ("lora", {"targets": "(q_proj"}, "lora.targets: not a valid regular expression (missing ), unterminated "
                                     "subpattern at position 0)"),
])
def test_settings_that_cannot_work_are_refused_before_anything_loads(section, values, message):
    assert problems({**MINIMAL, section: values}) == f"recipe has 1 problem(s):\n  - {message}"


def test_yaml_infinity_in_a_recipe_file_is_refused(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: builtin:tiny-mllama}\ndata: {train: t.jsonl}\ntrain: {learning_rate: .inf}\n",
                    encoding="utf-8")
    with pytest.raises(ToolkitError) as err:
        load_recipe(path)
    assert str(err.value) == f"{path} has 1 problem(s):\n  - train.learning_rate: Input should be a finite number"


@pytest.mark.parametrize("recipe_text, override, message", [
    ("model: {name: x}\ndata: {train: t}\n", "train.max_steps=[1",
     "--set train.max_steps: the value is not valid YAML (expected ',' or ']', but got '<stream end>' at line 1, "
     "column 3); quote it, e.g. --set 'train.max_steps=\"...\"'"),
    ("model: {name: x}\ndata: {train: t}\n", "train.seed=" + "[" * 3000,
     "--set train.seed: the value is nested too deeply to be a setting"),
    ("model: {name: x}\ndata: {train: t}\n", "model.name.x=1",
     "--set model.name.x: model.name is a value ('x'), not a section"),
    ("- a\n- b\n", "train.max_steps=5",
     "--set train.max_steps: the recipe is not a mapping of sections, so there is no key to set; fix the recipe file "
     "first"),
])
def test_set_problems_are_one_line_errors(tmp_path, recipe_text, override, message):
    path = tmp_path / "r.yaml"
    path.write_text(recipe_text, encoding="utf-8")
    with pytest.raises(ToolkitError) as err:
        load_recipe(path, [override])
    assert str(err.value) == message


def test_a_key_written_twice_is_an_error_naming_both_lines(tmp_path, capsys):
    from toolkit.cli import main

    path = tmp_path / "r.yaml"
    path.write_text("model:\n  name: builtin:tiny-mllama\ndata:\n  train: t.jsonl\ntrain:\n  learning_rate: 1.0e-3\n"
                    "  max_steps: 3\n  learning_rate: 5.0e-4\nmodel:\n  name: other\n", encoding="utf-8")
    with pytest.raises(ToolkitError) as err:
        load_recipe(path)
    assert str(err.value) == (f"{path}: key 'learning_rate' is written twice (lines 6 and 8); key 'model' is written "
                              "twice (lines 1 and 9); keep one of each")
    assert main(["sft", str(path), "--output-dir", str(tmp_path / "run")]) == 2
    assert "key 'learning_rate' is written twice (lines 6 and 8)" in capsys.readouterr().out
    assert not (tmp_path / "run").exists()


def test_a_merge_key_may_still_be_overridden(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("base: &b {r: 4, alpha: 8}\nmodel: {name: x}\ndata: {train: t}\nlora:\n  <<: *b\n  r: 16\n",
                    encoding="utf-8")
    with pytest.raises(ToolkitError, match="base: unknown key"):  # the anchor's holder is still an unknown key
        load_recipe(path)
    path.write_text("model: {name: x}\ndata: {train: t}\nlora: {<<: {r: 4, alpha: 8}, r: 16}\n", encoding="utf-8")
    recipe = load_recipe(path)
    assert (recipe.lora.r, recipe.lora.alpha) == (16, 8)


@pytest.mark.parametrize("overrides, message", [
    (["train.max_steps=3", "train.max_steps=4"],
     "--set train.max_steps is given twice ('train.max_steps=3' and 'train.max_steps=4'); keep one"),
    (["train={max_steps: 3}", "train.max_steps=4"],
     "--set train is given twice ('train={max_steps: 3}' and 'train.max_steps=4'); keep one"),
    (["lora={r: 3, r: 4}"], "--set lora: in its value, key 'r' is written twice (lines 1 and 1); keep one"),
])
def test_set_of_the_same_key_twice_is_an_error(tmp_path, overrides, message):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(MINIMAL), encoding="utf-8")
    with pytest.raises(ToolkitError) as err:
        load_recipe(path, overrides)
    assert str(err.value) == message
    assert load_recipe(path, ["train.max_steps=3", "train.seed=4"]).train.max_steps == 3  # different keys are fine
