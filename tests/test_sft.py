"""`toolkit sft` end to end on the built-in model: run directory contents, parameters that moved, exact
reproducibility, quantized training on CPU, and the errors a user will hit."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from conftest import tiny_recipe
from toolkit.cli import main


def lora_tensors(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter_model.safetensors"))


def losses(run_dir: Path) -> list[float]:
    history = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def test_run_directory_holds_the_adapter_and_its_story(tiny_run):
    names = {p.name for p in tiny_run.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "metrics.json", "loss.png",
            "README.md", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"} <= names
    assert "processor_config.json" in names  # the vision processor travels with the adapter
    assert not names & {"model.safetensors", "pytorch_model.bin"}  # the adapter only, not a copy of the base
    config = json.loads((tiny_run / "adapter_config.json").read_text(encoding="utf-8"))
    assert (Path(config["base_model_name_or_path"]) / "config.json").exists()  # loadable as written
    assert (tiny_run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    summary = json.loads((tiny_run / "metrics.json").read_text(encoding="utf-8"))["summary"]
    assert summary["steps"] == 12 and summary["lora_modules"] == 16


def test_every_self_attention_adapter_moved_and_none_sit_in_the_vision_tower(tiny_run):
    tensors = lora_tensors(tiny_run)
    assert len(tensors) == 32  # A and B for 16 modules
    assert not any("vision" in name for name in tensors)
    b_matrices = {name: t for name, t in tensors.items() if "lora_B" in name}  # B starts at zero
    for name, tensor in b_matrices.items():
        if "self_attn" in name:
            assert tensor.abs().max() > 0, name
        else:  # Mllama skips cross-attention layers for rows without an image: nothing to learn there
            assert "cross_attn" in name and tensor.abs().max() == 0, name


def test_training_is_exactly_reproducible(tmp_path, tiny_data, tiny_run):
    recipe = tiny_recipe(tmp_path, tiny_data)
    again = tmp_path / "again"
    assert main(["sft", str(recipe), "--output-dir", str(again)]) == 0
    assert losses(again) == losses(tiny_run)
    first, second = lora_tensors(again), lora_tensors(tiny_run)
    assert all((first[k] == second[k]).all() for k in first)
    assert losses(again)[-1] < losses(again)[0]


def test_grouping_rows_by_length_trains_the_same_rows(tmp_path, tiny_data):
    recipe = tiny_recipe(tmp_path, tiny_data, train={"group_by_length": True, "max_steps": 6})
    run_dir = tmp_path / "grouped"
    assert main(["sft", str(recipe), "--output-dir", str(run_dir)]) == 0
    assert len(losses(run_dir)) == 4 and all(loss > 0 for loss in losses(run_dir))


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantized_lora_trains_on_cpu(tmp_path, tiny_data, mode):
    recipe = tiny_recipe(tmp_path, tiny_data, quantization={"mode": mode}, train={"max_steps": 4})
    run_dir = tmp_path / mode
    assert main(["sft", str(recipe), "--output-dir", str(run_dir)]) == 0
    tensors = lora_tensors(run_dir)
    assert any(t.abs().max() > 0 for name, t in tensors.items() if "lora_B" in name)
    saved = (run_dir / "recipe.yaml").read_text(encoding="utf-8")
    assert f"mode: {mode}" in saved


def test_existing_run_is_not_overwritten(tmp_path, tiny_data, capsys):
    recipe = tiny_recipe(tmp_path, tiny_data, train={"max_steps": 2})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("mine", encoding="utf-8")
    assert main(["sft", str(recipe), "--output-dir", str(run_dir)]) == 2
    assert "pass --overwrite" in capsys.readouterr().out
    assert (run_dir / "keep.txt").exists()
    assert main(["sft", str(recipe), "--output-dir", str(run_dir), "--resume"]) == 2
    assert main(["sft", str(recipe), "--output-dir", str(run_dir), "--overwrite"]) == 0
    assert not (run_dir / "keep.txt").exists() and (run_dir / "adapter_model.safetensors").exists()


def test_resume_continues_from_the_last_checkpoint(tmp_path, tiny_data):
    recipe = tiny_recipe(tmp_path, tiny_data, train={"max_steps": 4, "save_steps": 2})
    run_dir = tmp_path / "run"
    assert main(["sft", str(recipe), "--output-dir", str(run_dir)]) == 0
    assert (run_dir / "checkpoint-4").is_dir()
    longer = tiny_recipe(tmp_path, tiny_data, train={"max_steps": 6, "save_steps": 2})
    assert main(["sft", str(longer), "--output-dir", str(run_dir), "--resume"]) == 0
    assert json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["summary"]["steps"] == 6


def test_unreachable_hub_model_is_one_line(tmp_path, tiny_data, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = tiny_recipe(tmp_path, tiny_data, model={"name": "meta-llama/Llama-3.2-11B-Vision-Instruct"})
    started = time.monotonic()
    assert main(["sft", str(recipe), "--output-dir", str(tmp_path / "run")]) == 2
    assert time.monotonic() - started < 30
    out = capsys.readouterr().out.replace("\n", "")
    assert "cannot load model 'meta-llama/Llama-3.2-11B-Vision-Instruct'" in out
    assert "toolkit sft recipes/quickstart.yaml" in out and "Traceback" not in out
    assert not (tmp_path / "run").exists()


def test_settings_the_machine_cannot_run_are_refused(tmp_path, tiny_data, capsys):
    recipe = tiny_recipe(tmp_path, tiny_data)
    assert main(["validate", str(recipe), "--set", "train.precision=fp16"]) == 2
    assert main(["validate", str(recipe), "--set", "train.liger_kernel=true"]) == 2
    out = capsys.readouterr().out
    assert "fp16 needs a CUDA GPU" in out and "liger_kernel=true needs a CUDA GPU" in out


def test_unwritable_output_directory(tmp_path, tiny_data, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x", encoding="utf-8")
    recipe = tiny_recipe(tmp_path, tiny_data)
    assert main(["sft", str(recipe), "--output-dir", str(blocker / "run")]) == 2
    assert "cannot write the run directory" in capsys.readouterr().out


def test_validate_checks_without_training(tmp_path, tiny_data, capsys):
    recipe = tiny_recipe(tmp_path, tiny_data)
    assert main(["validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "is valid; LoRA wraps 16 modules (4 cross-attention, 12 self-attention)" in out.replace("\n", "")


def test_a_run_keeps_the_built_in_build_it_was_trained_on(tiny_run, tmp_path):
    import shutil

    from toolkit import runs

    copy = tmp_path / "old-run"
    shutil.copytree(tiny_run, copy)
    config_path = copy / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    older = tmp_path / "tiny-mllama-older-build"
    shutil.copytree(config["base_model_name_or_path"], older)
    config["base_model_name_or_path"] = str(older)
    config_path.write_text(json.dumps(config), encoding="utf-8")
    assert runs.open_run(copy).model.name == str(older)
    shutil.rmtree(older)
    with pytest.raises(Exception, match="earlier build of builtin:tiny-mllama"):
        runs.open_run(copy)
