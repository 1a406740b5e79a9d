"""`toolkit sft` end to end on the built-in model: run directory contents, parameters that moved, exact
reproducibility, quantized training on CPU, and the errors a user will hit."""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe
from safetensors.torch import load_file, save_file

from toolkit import api
from toolkit.cli import main
from toolkit.config.recipe import load_recipe
from toolkit.data.batching import length_grouped_order
from toolkit.io import files
from toolkit.runs import rundir
from toolkit.training import trainer
from toolkit.training.prepare import prepare


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
    private = [p.name for p in tiny_run.iterdir() if p.is_file() and p.stat().st_mode & 0o777 != files.usual_mode()]
    assert private == []  # readable like plainly written files (safetensors and temporary files start as 0o600)


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


def batches_read_by_the_trainer(monkeypatch) -> list:
    """Fills with the batches the Trainer's data loader yields (pad tokens dropped), read just before training."""
    seen = []
    original = trainer.run_training

    def run_training(built, *args, **kwargs):
        pad = built.processing_class.pad_token_id
        seen.extend([[t for t in row if t != pad] for row in batch["input_ids"].tolist()]
                    for batch in built.get_train_dataloader())
        return original(built, *args, **kwargs)

    monkeypatch.setattr(trainer, "run_training", run_training)
    return seen


def test_grouped_rows_reach_the_trainer_in_the_grouped_order(tmp_path, tiny_data, monkeypatch):
    recipe = tiny_recipe(tmp_path, tiny_data, train={"group_by_length": True, "max_steps": 6})
    seen = batches_read_by_the_trainer(monkeypatch)
    run_dir = api.train(recipe, tmp_path / "grouped").path
    examples = prepare(load_recipe(recipe)).train.examples
    order = length_grouped_order([len(e.input_ids) for e in examples], batch_size=4, epochs=3, seed=42)
    assert seen == [[examples[i].input_ids for i in order[j : j + 4]] for j in range(0, len(order), 4)]
    assert len(losses(run_dir)) == 4
    metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["summary"]["epochs"] == 2.0  # 6 steps of 3 per pass over the 12 rows, not 6 of the 9 grouped
    assert [e["epoch"] for e in metrics["log_history"] if "loss" in e] == [0.3333, 0.6667, 1.3333, 2.0]
    assert "Trained 6 steps (2.0 epochs)" in (run_dir / "README.md").read_text(encoding="utf-8")


def layer_classes(model) -> tuple[str, str]:
    """The classes of an MLP projection LoRA does not wrap and of lm_head: what quantization decided."""
    modules = dict(model.named_modules())
    down = next(m for name, m in modules.items() if name.endswith("language_model.layers.0.mlp.down_proj"))
    head = next(m for name, m in modules.items() if name.endswith("lm_head"))
    return type(down).__name__, type(head).__name__


@pytest.mark.parametrize("mode, quantized", [("8bit", "Linear8bitLt"), ("4bit", "Linear4bit")])
def test_quantized_lora_trains_on_cpu(tmp_path, tiny_data, monkeypatch, mode, quantized):
    trained = []
    original = trainer.build_trainer

    def build_trainer(*args, **kwargs):
        built = original(*args, **kwargs)
        trained.append(layer_classes(built[0].model))
        return built

    monkeypatch.setattr(trainer, "build_trainer", build_trainer)
    recipe = tiny_recipe(tmp_path, tiny_data, quantization={"mode": mode}, train={"max_steps": 4})
    run_dir = api.train(recipe, tmp_path / mode).path
    assert trained == [(quantized, "Linear")]  # lm_head stays unquantized by default
    tensors = lora_tensors(run_dir)
    assert any(t.abs().max() > 0 for name, t in tensors.items() if "lora_B" in name)
    saved = (run_dir / "recipe.yaml").read_text(encoding="utf-8")
    assert f"mode: {mode}" in saved


def test_skip_modules_replaces_the_default_that_keeps_lm_head_unquantized():
    from toolkit.config.recipe import recipe_from_dict
    from toolkit.model import loading

    def loaded(**quantization):
        recipe = recipe_from_dict({"model": {"name": "builtin:tiny-mllama"}, "data": {"train": "t.jsonl"},
                                   "quantization": {"mode": "8bit", **quantization}})
        return loading.load_model(recipe, "fp32", loading.detect_accelerator())

    assert layer_classes(loaded()) == ("Linear8bitLt", "Linear")
    model = loaded(skip_modules=["model.vision_model"])
    assert layer_classes(model) == ("Linear8bitLt", "Linear8bitLt")
    vision = {type(m).__name__ for name, m in model.named_modules() if "vision_model" in name and "proj" in name}
    assert vision == {"Linear"}


def test_skip_modules_that_match_nothing_are_refused(tmp_path, tiny_data, capsys):
    """transformers matches an entry from the start of a module path or at its end, so `vision_model` alone would
    leave the vision tower quantized without a word."""
    recipe = tiny_recipe(tmp_path, tiny_data, quantization={"mode": "8bit", "skip_modules": ["vision_model", "x"]})
    assert main(["validate", str(recipe)]) == 2
    assert capsys.readouterr().out.replace("\n", "") == (
        "error: quantization.skip_modules: 'vision_model', 'x' match no linear layer of this model; an entry "
        "matches a module path from its start (e.g. model.vision_model) or its end (e.g. lm_head)")


def test_existing_folder_is_not_overwritten(tmp_path, tiny_data, capsys):
    recipe = tiny_recipe(tmp_path, tiny_data, train={"max_steps": 2})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "keep.txt").write_text("mine", encoding="utf-8")
    assert main(["sft", str(recipe), "--output-dir", str(run_dir)]) == 2
    assert "pass --overwrite" in capsys.readouterr().out
    assert main(["sft", str(recipe), "--output-dir", str(run_dir), "--resume"]) == 2
    assert "not a toolkit run directory" in capsys.readouterr().out
    assert (run_dir / "keep.txt").read_text(encoding="utf-8") == "mine"
    assert sorted(p.name for p in run_dir.iterdir()) == ["keep.txt"]


def interrupt_after_checkpoint(step: int, monkeypatch):
    """Ctrl-C right after checkpoint-`step` is written, as a user (or a preempted job) would stop a run."""
    def on_save(self, args, state, control, **kwargs):
        if state.global_step == step:
            raise KeyboardInterrupt
        return control

    monkeypatch.setattr(trainer.RichProgressCallback, "on_save", on_save, raising=False)


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory, tiny_data) -> dict:
    """One uninterrupted 6-step run, and a copy of the same recipe interrupted after checkpoint-4."""
    folder = tmp_path_factory.mktemp("resume")
    recipe = tiny_recipe(folder, tiny_data, train={"max_steps": 6, "save_steps": 2, "logging_steps": 1})
    whole = api.train(recipe, folder / "whole").path
    interrupted = folder / "interrupted"
    with pytest.MonkeyPatch.context() as patch:
        interrupt_after_checkpoint(4, patch)
        assert main(["sft", str(recipe), "--output-dir", str(interrupted)]) == 130
    return {"recipe": recipe, "whole": whole, "interrupted": interrupted}


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / run_dir.name
    shutil.copytree(run_dir, target)
    return target


def test_an_interrupted_run_is_kept_incomplete_and_refused_by_readers(six_steps, tmp_path, capsys):
    run_dir = six_steps["interrupted"]
    assert sorted(p.name for p in rundir.checkpoints(run_dir)) == ["checkpoint-2", "checkpoint-4"]
    assert not files.is_complete(run_dir, "run") and not (run_dir / files.LOCK).exists()
    assert main(["eval", str(run_dir)]) == 2
    assert "is an interrupted run" in capsys.readouterr().out
    again = copy_of(run_dir, tmp_path)
    assert main(["sft", str(six_steps["recipe"]), "--output-dir", str(again)]) == 2
    assert "holds an interrupted run; pass --resume" in capsys.readouterr().out


def test_resume_ends_in_the_uninterrupted_adapter(six_steps, tmp_path):
    run_dir = copy_of(six_steps["interrupted"], tmp_path)
    assert main(["sft", str(six_steps["recipe"]), "--output-dir", str(run_dir), "--resume"]) == 0
    resumed, whole = lora_tensors(run_dir), lora_tensors(six_steps["whole"])
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)
    assert losses(run_dir)[-2:] == losses(six_steps["whole"])[-2:]
    assert files.is_complete(run_dir, "run")


def test_resume_starts_from_the_checkpoints_weights(six_steps, tmp_path):
    """A changed checkpoint must change the result: a resume that restarted from scratch would not notice."""
    run_dir = copy_of(six_steps["interrupted"], tmp_path)
    adapter = run_dir / "checkpoint-4" / "adapter_model.safetensors"
    tensors = load_file(str(adapter))
    save_file({k: v + 0.05 if "lora_B" in k else v for k, v in tensors.items()}, str(adapter))
    assert main(["sft", str(six_steps["recipe"]), "--output-dir", str(run_dir), "--resume"]) == 0
    resumed, whole = lora_tensors(run_dir), lora_tensors(six_steps["whole"])
    assert any((resumed[k] - whole[k]).abs().max() > 0.01 for k in whole if "lora_B" in k and "self_attn" in k)


def cut_short(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:100])


@pytest.mark.parametrize("damage, problem", [
    (lambda folder: (folder / "trainer_state.json").unlink(), "missing trainer_state.json"),  # killed mid-save
    (lambda folder: cut_short(folder / "optimizer.pt"), "optimizer.pt is damaged (not a complete archive)"),
])
def test_resume_skips_a_checkpoint_cut_short_by_a_crash(six_steps, tmp_path, capsys, damage, problem):
    run_dir = copy_of(six_steps["interrupted"], tmp_path)
    damage(run_dir / "checkpoint-4")
    assert main(["sft", str(six_steps["recipe"]), "--output-dir", str(run_dir), "--resume"]) == 0
    out = capsys.readouterr().out.replace("\n", "")
    assert f"checkpoint-4: incomplete ({problem})" in out and f"resuming from {run_dir / 'checkpoint-2'}" in out
    resumed, whole = lora_tensors(run_dir), lora_tensors(six_steps["whole"])
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_resume_picks_the_highest_step_not_the_last_name(six_steps, tmp_path):
    """checkpoint-10 is newer than checkpoint-8, though "checkpoint-8" sorts after it as text."""
    run_dir = copy_of(six_steps["interrupted"], tmp_path)
    for old, new in (("checkpoint-2", 10), ("checkpoint-4", 8)):
        state_file = run_dir / old / "trainer_state.json"
        state = json.loads(state_file.read_text(encoding="utf-8"))
        state_file.write_text(json.dumps({**state, "global_step": new}), encoding="utf-8")
        (run_dir / old).rename(run_dir / f"checkpoint-{new}")
    assert [p.name for p in rundir.checkpoints(run_dir)] == ["checkpoint-10", "checkpoint-8"]
    assert rundir.resumable_checkpoint(run_dir) == (run_dir / "checkpoint-10", [])


def test_resume_on_a_finished_run_changes_nothing(six_steps, tmp_path, capsys):
    run_dir = copy_of(six_steps["whole"], tmp_path)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    assert main(["sft", str(six_steps["recipe"]), "--output-dir", str(run_dir), "--resume"]) == 0
    assert "is a finished run; --resume only continues an interrupted one, so nothing was trained" in \
        capsys.readouterr().out.replace("\n", "")
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == before


def fail_at_first_checkpoint(monkeypatch, error: Exception):
    def on_save(self, args, state, control, **kwargs):
        raise error

    monkeypatch.setattr(trainer.RichProgressCallback, "on_save", on_save, raising=False)


def test_a_checkpoint_that_fills_the_disk_is_one_line(tmp_path, tiny_data, monkeypatch, capsys):
    """torch's archive writer fails on a full disk without naming the cause; with no space left, that is the cause."""
    recipe = tiny_recipe(tmp_path, {"train": tiny_data["train"]}, train={"max_steps": 2, "save_steps": 1})
    fail_at_first_checkpoint(monkeypatch, RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos"))
    monkeypatch.setattr(files, "FULL_BELOW", 2**62)  # every disk counts as full
    run_dir = tmp_path / "run"
    assert main(["sft", str(recipe), "--output-dir", str(run_dir)]) == 2
    assert capsys.readouterr().out.replace("\n", "").endswith(
        f"error: the disk holding {run_dir} is full ([enforce fail at inline_container.cc:672] . unexpected pos); "
        "free space, then continue with --resume (from checkpoint-1)")
    assert [p.name for p in rundir.checkpoints(run_dir)] == ["checkpoint-1"] and not files.is_complete(run_dir, "run")
    monkeypatch.setattr(files, "FULL_BELOW", 0)  # with space left the same failure is not blamed on the disk
    assert main(["sft", str(recipe), "--output-dir", str(tmp_path / "other")]) == 1
    assert "unexpected RuntimeError in toolkit sft" in capsys.readouterr().out


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

    from toolkit.runs import rundir

    copy = tmp_path / "old-run"
    shutil.copytree(tiny_run, copy)
    config_path = copy / "adapter_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    older = tmp_path / "tiny-mllama-older-build"
    shutil.copytree(config["base_model_name_or_path"], older)
    config["base_model_name_or_path"] = str(older)
    config_path.write_text(json.dumps(config), encoding="utf-8")
    assert rundir.open_run(copy).model.name == str(older)
    shutil.rmtree(older)
    with pytest.raises(Exception, match="earlier build of builtin:tiny-mllama"):
        rundir.open_run(copy)


def snapshot(run_dir: Path) -> dict:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}


def refuse_model_loading(monkeypatch):
    from toolkit.model import loading

    def load_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the resume was checked")

    monkeypatch.setattr(loading, "load_model", load_model)


def resume_refusal(six_steps, tmp_path, monkeypatch, capsys, *overrides: str, extra=()) -> tuple[Path, str]:
    """Resume a copy of the interrupted run with `overrides`; it must exit 2 before any model loads and change
    nothing in the run directory. Returns the copy and the one error line."""
    run_dir = copy_of(six_steps["interrupted"], tmp_path)
    before = snapshot(run_dir)
    refuse_model_loading(monkeypatch)
    sets = [f"--set={o}" for o in overrides]
    assert main(["sft", str(six_steps["recipe"]), "--output-dir", str(run_dir), "--resume", *sets, *extra]) == 2
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("error:")]
    assert len(lines) == 1
    assert snapshot(run_dir) == before and not files.is_complete(run_dir, "run")
    return run_dir, lines[0]


REFUSAL_END = ("Set them back as the run started (in the recipe or --set), or start a new run with another "
               "--output-dir or --overwrite")


def test_a_run_records_what_it_was_started_with(six_steps, tiny_data):
    record = json.loads((six_steps["interrupted"] / "started.json").read_text(encoding="utf-8"))
    assert record["resumes"] == []
    started = record["started"]
    assert started["recipe"]["lora"]["r"] == 8 and started["recipe"]["train"]["max_steps"] == 6
    assert (started["precision"], started["processes"], started["strategy"]) == ("fp32", 1, "ddp")
    digest = hashlib.sha256(Path(tiny_data["train"]).read_bytes()).hexdigest()
    assert started["contents"]["data.train"] == [digest]
    assert started["contents"]["images"]["count"] == 0


def test_resume_with_another_lora_rank_is_refused_before_any_model_loads(six_steps, tmp_path, monkeypatch, capsys):
    run_dir, line = resume_refusal(six_steps, tmp_path, monkeypatch, capsys, "lora.r=4")
    assert line == (f"error: --resume: {run_dir} was started with other settings, and continuing it with these would "
                    f"make its adapter something other than its record says: lora.r 8 -> 4. {REFUSAL_END}")


def test_resume_below_the_steps_already_trained_is_refused(six_steps, tmp_path, monkeypatch, capsys):
    run_dir, line = resume_refusal(six_steps, tmp_path, monkeypatch, capsys, "train.max_steps=3")
    assert "train.max_steps 6 -> 3 is below the 4 steps checkpoint-4 has already trained" in line
    assert not (run_dir / "checkpoint-5").exists()
    _, line = resume_refusal(six_steps, tmp_path / "epochs", monkeypatch, capsys, "train.max_steps=null",
                             "train.epochs=0.5")  # 4 steps of 4 rows are 16 rows: 1.33 epochs of 12
    assert "train.epochs 3.0 -> 0.5 is below the 1.33333 epochs checkpoint-4 has already trained" in line


def test_resume_with_other_data_and_learning_rate_names_every_change(six_steps, tmp_path, monkeypatch, capsys,
                                                                       tiny_data):
    other = tmp_path / "other.jsonl"
    other.write_text(Path(tiny_data["train"]).read_text(encoding="utf-8").replace("입니다", "이다"), encoding="utf-8")
    run_dir, line = resume_refusal(six_steps, tmp_path, monkeypatch, capsys, f"data.train={other}",
                                   "train.learning_rate=0.0005", "train.max_steps=8")
    old = hashlib.sha256(Path(tiny_data["train"]).read_bytes()).hexdigest()[:12]
    new = hashlib.sha256(other.read_bytes()).hexdigest()[:12]
    assert line == (f"error: --resume: {run_dir} was started with other settings, and continuing it with these would "
                    f"make its adapter something other than its record says: train.learning_rate 0.005 -> 0.0005; "
                    f"data.train contents changed ({tiny_data['train']} sha256 {old} -> {other} sha256 {new}). "
                    f"{REFUSAL_END}")


def test_resume_on_a_number_of_processes_that_changes_the_global_batch_is_refused(six_steps, tmp_path, monkeypatch,
                                                                                  capsys):
    _, line = resume_refusal(six_steps, tmp_path, monkeypatch, capsys, extra=["--gpus", "3"])
    assert ("--gpus 1 -> 3: the global batch 4 x 1 cannot be split over 3 processes, so each step would train on a "
            "different batch") in line


def test_resume_on_a_number_of_processes_that_keeps_the_global_batch_goes_ahead(six_steps, tmp_path, monkeypatch):
    from toolkit.training import distributed

    launched = []
    monkeypatch.setattr(distributed, "launch", lambda argv, processes: launched.append((argv, processes)) or 1)
    run_dir = copy_of(six_steps["interrupted"], tmp_path)
    assert main(["sft", str(six_steps["recipe"]), "--output-dir", str(run_dir), "--resume", "--gpus", "2"]) == 2
    assert launched and launched[0][1] == 2 and "--resume" in launched[0][0]
    record = json.loads((run_dir / "started.json").read_text(encoding="utf-8"))
    assert record["resumes"] == [{"from": "checkpoint-4", "step": 4, "changes": {"--gpus": [1, 2]}}]


def test_harmless_changes_are_accepted_and_the_run_keeps_both_recipes(six_steps, tmp_path, capsys):
    run_dir = copy_of(six_steps["interrupted"], tmp_path)
    assert main(["sft", str(six_steps["recipe"]), "--output-dir", str(run_dir), "--resume", "--set",
                 "train.max_steps=8", "--set", "train.logging_steps=2", "--set", "train.save_total_limit=1"]) == 0
    out = capsys.readouterr().out.replace("\n", "")
    assert ("note: this resume changes train.logging_steps 1 -> 2, train.max_steps 6 -> 8, train.save_total_limit "
            "2 -> 1 (nothing that changes what is learned); recorded in started.json and the run card") in out
    record = json.loads((run_dir / "started.json").read_text(encoding="utf-8"))
    assert record["started"]["recipe"]["train"]["max_steps"] == 6
    assert record["resumes"] == [{"from": "checkpoint-4", "step": 4, "changes": {
        "train.logging_steps": [1, 2], "train.max_steps": [6, 8], "train.save_total_limit": [2, 1]}}]
    assert load_recipe(run_dir / "recipe.yaml").train.max_steps == 8
    assert json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["summary"]["steps"] == 8
    card = (run_dir / "README.md").read_text(encoding="utf-8")
    assert ("Resumed from checkpoint-4 (step 4), changing `train.logging_steps` 1 -> 2, `train.max_steps` 6 -> 8, "
            "`train.save_total_limit` 2 -> 1.") in card
    assert files.is_complete(run_dir, "run")


def test_resume_of_a_run_without_a_record_is_refused(six_steps, tmp_path, monkeypatch, capsys):
    run_dir = copy_of(six_steps["interrupted"], tmp_path)
    (run_dir / "started.json").unlink()
    refuse_model_loading(monkeypatch)
    assert main(["sft", str(six_steps["recipe"]), "--output-dir", str(run_dir), "--resume"]) == 2
    assert capsys.readouterr().out.replace("\n", "").endswith(
        f"error: --resume: {run_dir} does not record what it was started with (no started.json: an earlier toolkit "
        "started it), so continuing it cannot be checked; start a new run with --overwrite or another --output-dir")
