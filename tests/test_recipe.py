"""The recipe schema: every shipped recipe validates, and mistakes are errors that name their key path."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from toolkit.errors import ToolkitError
from toolkit.recipe import load_recipe, recipe_from_dict, save_recipe

RECIPES = sorted(Path(__file__).resolve().parent.parent.joinpath("recipes").glob("*.yaml"))
MINIMAL = {"model": {"name": "builtin:tiny-mllama"}, "data": {"train": "train.jsonl"}}


def problems(data: dict) -> str:
    with pytest.raises(ToolkitError) as err:
        recipe_from_dict(data)
    return str(err.value)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipe_validates_and_names_its_command(path):
    recipe = load_recipe(path)
    assert recipe.model.name and recipe.data.train
    first_line = path.read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith("# toolkit ") and path.name in first_line


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
    from toolkit.recipe import Recipe

    readme = Path(__file__).resolve().parent.parent.joinpath("README.md").read_text(encoding="utf-8")
    missing = []
    for section, field in Recipe.model_fields.items():
        assert f"`{section}`" in readme, section
        model = field.annotation if isinstance(field.annotation, type) else None
        for key in getattr(model, "model_fields", {}):
            if f"`{key}`" not in readme:
                missing.append(f"{section}.{key}")
    assert missing == []
