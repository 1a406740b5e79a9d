"""train.report_to: passed to the Trainer as given, checked by name in the schema, and a tracker whose package is
missing is a one-line error from validate (and so from sft) before any model loads."""

from __future__ import annotations

from importlib.util import find_spec

import pytest
from conftest import tiny_recipe

from toolkit import api
from toolkit.cli import main
from toolkit.config.precision import Accelerator
from toolkit.config.recipe import TrainSection, recipe_from_dict
from toolkit.config.translate import to_sft_config
from toolkit.errors import ToolkitError

CPU = Accelerator(cuda=False, bf16=False)
MINIMAL = {"model": {"name": "builtin:tiny-mllama"}, "data": {"train": "train.jsonl"}}


def sft_config(**train):
    return to_sft_config(TrainSection(**train), "fp32", CPU, "out", has_eval=False)


def test_report_to_reaches_the_trainer_config_as_given():
    assert sft_config().report_to == []  # none: transformers' own spelling of "no trackers"
    assert sft_config(report_to="tensorboard").report_to == ["tensorboard"]
    assert sft_config(report_to=["wandb", "mlflow"]).report_to == ["wandb", "mlflow"]


def schema_error(report_to) -> str:
    with pytest.raises(ToolkitError) as err:
        recipe_from_dict({**MINIMAL, "train": {"report_to": report_to}})
    return str(err.value)


def test_unknown_or_mixed_tracker_names_are_schema_errors():
    assert "train.report_to: unknown tracker 'tensorbord'; choose from: none, all, " in schema_error("tensorbord")
    assert "train.report_to: none and all stand alone, not in a list with other trackers" in \
        schema_error(["none", "wandb"])
    assert "train.report_to: a tracker is named twice" in schema_error(["wandb", "wandb"])
    assert "train.report_to: give a tracker name or a list of them (none turns reporting off)" in schema_error([])


def test_a_missing_tracker_package_is_one_line_before_training(tmp_path, tiny_data, capsys, monkeypatch):
    import transformers.integrations as integrations

    monkeypatch.setattr(integrations, "is_wandb_available", lambda: False)
    monkeypatch.setattr(integrations, "is_mlflow_available", lambda: False)
    recipe = tiny_recipe(tmp_path, tiny_data, train={"report_to": "wandb"})
    assert main(["validate", str(recipe)]) == 2
    out = capsys.readouterr().out
    assert "error: train.report_to: wandb is not installed; pip install wandb, or set train.report_to: none\n" in out
    run_dir = tmp_path / "run"
    assert main(["sft", str(recipe), "--output-dir", str(run_dir), "--set", "train.report_to=[wandb, mlflow]"]) == 2
    assert "train.report_to: wandb, mlflow are not installed; pip install wandb mlflow, or set train.report_to: " \
           "none" in capsys.readouterr().out
    assert not run_dir.exists()


def test_comet_needs_its_own_package_name(monkeypatch):
    import transformers.integrations as integrations

    from toolkit.training.trackers import check_installed

    monkeypatch.setattr(integrations, "is_comet_available", lambda: False)
    with pytest.raises(ToolkitError, match=r"^train.report_to: comet_ml is not installed; pip install comet-ml, or"):
        check_installed("comet_ml")


@pytest.mark.skipif(find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_writes_event_files_into_the_run(tmp_path, tiny_data):
    recipe = tiny_recipe(tmp_path, tiny_data, train={"max_steps": 2, "report_to": "tensorboard"})
    run_dir = api.train(recipe, tmp_path / "run").path
    assert list(run_dir.glob("runs/*/events.out.tfevents.*"))
    assert (run_dir / "metrics.json").is_file() and (run_dir / "loss.png").is_file()
