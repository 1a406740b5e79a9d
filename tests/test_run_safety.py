"""What sft and merge may delete or replace, and that a diverged run is never reported as finished."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import tiny_recipe
from safetensors.torch import load_file, save_file

from toolkit.cli import main
from toolkit.io import files
from toolkit.runs import rundir
from toolkit.training import trainer


def sft(recipe: Path, run_dir: Path | str, *extra: str) -> int:
    return main(["sft", str(recipe), "--output-dir", str(run_dir), *extra])


@pytest.fixture()
def short_recipe(tmp_path, tiny_data) -> Path:
    return tiny_recipe(tmp_path, tiny_data, train={"max_steps": 2, "save_steps": 2})


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "notes.txt").write_text("mine", encoding="utf-8")
    (path / ".git").mkdir()
    (path / ".git" / "HEAD").write_text("ref: refs/heads/main\n", encoding="utf-8")
    return path


def test_overwrite_refuses_a_folder_the_toolkit_did_not_make(tmp_path, short_recipe, capsys):
    folder = user_folder(tmp_path / "clone")
    assert sft(short_recipe, folder, "--overwrite") == 2
    assert "not made by toolkit (no .toolkit.json)" in capsys.readouterr().out
    assert (folder / "notes.txt").read_text(encoding="utf-8") == "mine" and (folder / ".git" / "HEAD").exists()


@pytest.mark.parametrize("where", ["cwd", "parent", "home"])
def test_overwrite_never_touches_the_current_directory_its_parents_or_home(tmp_path, short_recipe, monkeypatch,
                                                                            capsys, where):
    home = user_folder(tmp_path / "home")
    work = user_folder(home / "project" / "sub")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    target = {"cwd": ".", "parent": "..", "home": "~"}[where]
    files.write_marker(Path(target).expanduser(), "run", complete=True)  # even a marker does not make them fair game
    assert sft(short_recipe, target, "--overwrite") == 2
    reason = {"cwd": "it is the current directory", "parent": "it contains the current directory",
              "home": "it is the home directory"}[where]
    assert reason in capsys.readouterr().out
    assert (work / "notes.txt").exists() and (home / "notes.txt").exists() and (home / ".git" / "HEAD").exists()


def test_overwrite_replaces_a_run_the_toolkit_made(tmp_path, short_recipe):
    run_dir = tmp_path / "run"
    assert sft(short_recipe, run_dir) == 0
    (run_dir / "stale.txt").write_text("left by the earlier run", encoding="utf-8")
    assert sft(short_recipe, run_dir, "--overwrite") == 0
    assert not (run_dir / "stale.txt").exists()
    assert files.is_complete(run_dir, "run") and not (run_dir / files.LOCK).exists()


def test_overwrite_never_replaces_a_directory_the_toolkit_made_for_another_purpose(tiny_run, tmp_path,
                                                                                   short_recipe, capsys):
    """A merged model is not a run for sft --overwrite, and a run is not a merged model for merge --overwrite."""
    merged, run = tmp_path / "merged", tmp_path / "run"
    for folder, kind in ((merged, "merged"), (run, "run")):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"weights")
        files.write_marker(folder, kind, complete=True)
    assert sft(short_recipe, merged, "--overwrite") == 2
    assert capsys.readouterr().out.replace("\n", "").endswith(
        f"error: --output-dir {merged} is a toolkit merged directory; --overwrite only replaces a run directory the "
        "toolkit made. Remove it yourself or choose another directory")
    assert main(["merge", str(tiny_run), "--output", str(run), "--overwrite"]) == 2
    assert capsys.readouterr().out.replace("\n", "").endswith(
        f"error: --output {run} is a toolkit run directory; --overwrite only replaces a merged directory the "
        "toolkit made. Remove it yourself or choose another directory")
    for folder, kind in ((merged, "merged"), (run, "run")):
        assert sorted(p.name for p in folder.iterdir()) == [files.MARKER, "model.safetensors"]
        assert files.is_complete(folder, kind)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["merged", "run", "recipe.yaml"])


def test_tilde_is_expanded_for_every_file_of_the_run(tmp_path, short_recipe, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "README.md").write_text("the user's own", encoding="utf-8")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    assert sft(short_recipe, "~/runs/tilde") == 0
    assert (home / "runs" / "tilde" / "adapter_model.safetensors").is_file()
    assert (home / "runs" / "tilde" / "checkpoint-2").is_dir()
    assert not (tmp_path / "~").exists()
    assert (home / "README.md").read_text(encoding="utf-8") == "the user's own"


def test_merge_overwrite_refuses_a_folder_of_user_files(tiny_run, tmp_path, capsys):
    folder = user_folder(tmp_path / "photos")
    assert main(["merge", str(tiny_run), "--output", str(folder), "--overwrite"]) == 2
    assert "not made by toolkit" in capsys.readouterr().out
    assert sorted(p.name for p in folder.iterdir()) == [".git", "notes.txt"]


def test_merge_overwrite_replaces_its_own_merged_model(tiny_run, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", str(tiny_run), "--output", str(out), "--dtype", "fp32"]) == 0
    assert files.is_complete(out, "merged")
    (out / "stale.bin").write_bytes(b"old")
    assert main(["merge", str(tiny_run), "--output", str(out), "--dtype", "fp32", "--overwrite"]) == 0
    assert not (out / "stale.bin").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no staging folder left beside it


def poison_after_step(step: int, monkeypatch):
    """Make one adapter weight NaN at the end of `step`, as a diverging optimizer step would."""
    original = trainer.RichProgressCallback.on_step_end

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == step:
            name, param = next((n, p) for n, p in model.named_parameters() if "lora_B" in n and "self_attn" in n)
            with torch.no_grad():
                param.view(-1)[0] = float("nan")
        return original(self, args, state, control, model=model, **kwargs)

    monkeypatch.setattr(trainer.RichProgressCallback, "on_step_end", on_step_end)


def test_a_diverged_run_is_never_saved_as_finished(tmp_path, tiny_data, monkeypatch, capsys):
    recipe = tiny_recipe(tmp_path, tiny_data, train={"max_steps": 6, "save_steps": 2, "logging_steps": 5})
    poison_after_step(3, monkeypatch)
    run_dir = tmp_path / "run"
    assert sft(recipe, run_dir) == 2
    out = capsys.readouterr().out.replace("\n", "")
    assert "training diverged: adapter weight" in out and "is NaN or inf after step 4" in out
    assert not files.is_complete(run_dir, "run")
    assert not (run_dir / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in rundir.checkpoints(run_dir)) == ["checkpoint-2"]  # nothing saved after the NaN
    assert rundir.checkpoint_problem(run_dir / "checkpoint-2") is None
    assert main(["eval", str(run_dir)]) == 2 and main(["merge", str(run_dir), "--output", str(tmp_path / "m")]) == 2
    assert main(["extract", str(run_dir), "--output", str(tmp_path / "a.safetensors")]) == 2


def test_a_nan_loss_stops_training(tmp_path):
    guard = trainer.FiniteGuard("bf16")
    control = type("Control", (), {"should_training_stop": False, "should_save": True})()
    state = type("State", (), {"global_step": 7})()
    guard.on_log(None, state, control, logs={"loss": float("nan"), "grad_norm": 1.0})
    assert guard.problem == "loss is nan at step 7"
    assert control.should_training_stop and not control.should_save
    for precision in ("bf16", "fp32"):  # no loss scaler: a NaN gradient norm is divergence, at its first log
        guard, control.should_training_stop, control.should_save = trainer.FiniteGuard(precision), False, True
        guard.on_log(None, state, control, logs={"loss": 1.0, "grad_norm": float("nan")})
        assert guard.problem == "grad_norm is nan at step 7"
        assert control.should_training_stop and not control.should_save
    fp16 = trainer.FiniteGuard("fp16")  # an inf gradient norm is the fp16 loss scaler skipping a step
    fp16.on_log(None, state, control, logs={"loss": 1.0, "grad_norm": float("inf")})
    assert fp16.problem is None


def damaged_copy(tiny_run, tmp_path, damage) -> Path:
    run_dir = tmp_path / "damaged"
    shutil.copytree(tiny_run, run_dir, ignore=shutil.ignore_patterns("checkpoint-*"))
    damage(run_dir)
    return run_dir


def nan_adapter(run_dir: Path) -> None:
    tensors = load_file(str(run_dir / "adapter_model.safetensors"))
    first = sorted(tensors)[0]
    tensors[first] = tensors[first].clone()
    tensors[first].view(-1)[0] = float("nan")
    save_file(tensors, str(run_dir / "adapter_model.safetensors"))


def truncate_adapter(run_dir: Path) -> None:
    path = run_dir / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:200])


def empty_config(run_dir: Path) -> None:
    (run_dir / "adapter_config.json").write_text("", encoding="utf-8")


def truncate_tokenizer(run_dir: Path) -> None:
    (run_dir / "tokenizer.json").write_text('{"trunc', encoding="utf-8")


def retarget_config(run_dir: Path) -> None:
    config = json.loads((run_dir / "adapter_config.json").read_text(encoding="utf-8"))
    config["r"] = 4  # the saved weights are rank 8
    (run_dir / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")


@pytest.mark.parametrize("damage, message", [
    (nan_adapter, "holds NaN or inf values"),
    (truncate_adapter, "is not a readable safetensors file"),
    (empty_config, "adapter_config.json is not valid JSON"),
    (truncate_tokenizer, "the run's tokenizer files cannot be read"),
    (retarget_config, "the adapter does not fit its base model builtin:tiny-mllama"),
])
@pytest.mark.parametrize("command", ["eval", "extract", "merge", "generate"])
def test_every_reader_refuses_a_damaged_run_in_one_line(tiny_run, tmp_path, capsys, damage, message, command):
    run_dir = damaged_copy(tiny_run, tmp_path, damage)
    extra = {"eval": [], "extract": ["--output", str(tmp_path / "a.safetensors")],
             "merge": ["--output", str(tmp_path / "merged")], "generate": ["hello"]}[command]
    assert main([command, str(run_dir), *extra]) == 2
    out = capsys.readouterr().out.replace("\n", "")
    assert message in out and "Traceback" not in out
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "merged").exists()


def test_merge_fails_closed_on_nan():
    from toolkit.commands.merge import verdict
    from toolkit.export.merging import passes

    nan = float("nan")
    result = {"max_abs_delta": nan, "max_abs_logit": 3.0, "adapter_effect": 1.0}
    assert not passes(result, tolerance=0.1, traces=[])
    report = {**result, "tolerance": 0.1, "dtype": "bf16", "passed": False}
    assert verdict(Path("out"), report, []) == 1


def test_metrics_json_is_strict_json(tmp_path):
    from toolkit.ui.report import write_json

    write_json(tmp_path / "m.json", {"loss": float("nan"), "history": [{"grad_norm": float("inf")}, {"x": 1.5}]})
    text = (tmp_path / "m.json").read_text(encoding="utf-8")
    assert json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name}")) == {
        "loss": None, "history": [{"grad_norm": None}, {"x": 1.5}]}


DAMAGED_MARKERS = {
    "cut short": ('{"made_by": "toolkit", "kind": "run", "complete": fals', "not valid JSON, perhaps cut short"),
    "not json": ("\x00\x01garbage", "not valid JSON, perhaps cut short"),
    "a list": ('["made_by", "toolkit"]', "not a JSON object"),
    "no kind": ('{"made_by": "toolkit", "complete": true}', "it names no kind"),
    "complete as text": ('{"made_by": "toolkit", "kind": "run", "complete": "yes"}',
                         "its 'complete' is not true or false"),
}


@pytest.mark.parametrize("marker", DAMAGED_MARKERS, ids=list(DAMAGED_MARKERS))
@pytest.mark.parametrize("command", ["eval", "extract", "merge", "generate", "sft", "sft --overwrite",
                                     "sft --resume"])
def test_a_damaged_marker_is_a_damaged_run_for_every_command(tiny_run, tiny_data, tmp_path, capsys, command, marker):
    text, why = DAMAGED_MARKERS[marker]
    run_dir = damaged_copy(tiny_run, tmp_path, lambda folder: (folder / files.MARKER).write_text(text, "utf-8"))
    before = sorted((p.relative_to(run_dir), p.read_bytes()) for p in run_dir.rglob("*") if p.is_file())
    argv = {"eval": ["eval", str(run_dir)],
            "extract": ["extract", str(run_dir), "--output", str(tmp_path / "a.safetensors")],
            "merge": ["merge", str(run_dir), "--output", str(tmp_path / "merged")],
            "generate": ["generate", str(run_dir), "hello"]}.get(command)
    if argv is None:
        recipe = tiny_recipe(tmp_path, tiny_data, train={"max_steps": 2, "save_steps": 2})
        argv = ["sft", str(recipe), "--output-dir", str(run_dir), *command.split()[1:]]
    assert main(argv) == 2
    out = capsys.readouterr().out
    assert out.replace("\n", "").split("error: ")[-1] == (
        f"{run_dir / files.MARKER} is damaged ({why}): the toolkit cannot tell what {run_dir} holds or whether "
        f"it is finished, so it neither uses nor replaces it; write to a new directory (train again, for a run) and "
        f"remove {run_dir} yourself once it is no longer needed")
    assert sorted((p.relative_to(run_dir), p.read_bytes()) for p in run_dir.rglob("*") if p.is_file()) == before
    assert not (tmp_path / "a.safetensors").exists() and not (tmp_path / "merged").exists()


def test_a_toolkit_marker_of_another_kind_is_named(tiny_run, tmp_path, short_recipe, capsys):
    folder = damaged_copy(tiny_run, tmp_path, lambda folder: files.write_marker(folder, "merged", complete=True))
    assert sft(short_recipe, folder, "--overwrite") == 2
    assert (f"--output-dir {folder} is a toolkit merged directory; --overwrite only replaces a run directory"
            in capsys.readouterr().out.replace("\n", ""))
