"""The run directory: what a training run leaves behind, how it is claimed, and how later commands read it back."""

from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from toolkit.model import builtin, loading
from toolkit.training import distributed
from toolkit.io import files
from toolkit.runs import resume
from toolkit.errors import ToolkitError, first_line
from toolkit.config.recipe import RECIPE_FILE, load_recipe, save_recipe
from toolkit.ui.report import write_json

METRICS_FILE = "metrics.json"
LOSS_PLOT = "loss.png"
ADAPTER_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
KIND = "run"
# The Trainer writes a checkpoint's trainer_state.json after its weights, optimizer, scheduler and RNG state, so a
# checkpoint whose state file reads back (and whose adapter opens) was written to the end.
CHECKPOINT_FILES = ("trainer_state.json", ADAPTER_FILE, "optimizer.pt", "scheduler.pt")


def checkpoints(run_dir: Path) -> list[Path]:
    """checkpoint-N folders, newest first."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-")[-1]), reverse=True)


def checkpoint_problem(folder: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (None when it is complete)."""
    missing = [name for name in CHECKPOINT_FILES if not (folder / name).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    try:
        state = json.loads((folder / "trainer_state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "trainer_state.json is unreadable"
    if not isinstance(state, dict) or state.get("global_step") != int(folder.name.split("-")[-1]):
        return "trainer_state.json does not match the folder's step"
    return adapter_file_problem(folder / ADAPTER_FILE) or damaged_archive(folder)


def damaged_archive(folder: Path) -> str | None:
    """The first of a checkpoint's torch files (optimizer, scheduler, RNG state) that is cut short or altered:
    torch saves zip archives with a checksum per entry, so this is found without unpickling anything."""
    import zipfile

    for path in sorted(folder.glob("*.pt")) + sorted(folder.glob("*.pth")):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (OSError, zipfile.BadZipFile, EOFError):
            return f"{path.name} is damaged (not a complete archive)"
        if bad is not None:
            return f"{path.name} is damaged (entry {bad} fails its checksum)"
    return None


def resumable_checkpoint(run_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint, and the newer ones skipped with the reason (a crash while saving)."""
    skipped = []
    for folder in checkpoints(run_dir):
        problem = checkpoint_problem(folder)
        if problem is None:
            return folder, skipped
        skipped.append((folder, problem))
    return None, skipped


def adapter_file_problem(path: Path) -> str | None:
    """Why an adapter file is not a usable adapter: unreadable, truncated, or holding NaN/inf values."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                tensor = handle.get_tensor(key)
                if tensor.is_floating_point() and not tensor.isfinite().all():
                    return f"{path.name}: tensor {key} holds NaN or inf values"
    except FileNotFoundError:
        return f"{path.name} is missing"
    except Exception as err:  # safetensors raises its own error types for truncated or corrupt files
        return f"{path.name} is not a readable safetensors file ({first_line(err, 120)})"
    return None


@dataclass
class Claim:
    """What `claimed_run_dir` found and did: the checkpoint to resume from, and whether the run is already done."""

    run_dir: Path
    created: bool
    resume_from: Path | None = None
    skipped: list = field(default_factory=list)
    finished: bool = False


def check_writable(run_dir: Path) -> None:
    """Refuse before anything is written: the run directory (or the folder it will be made in) must take files,
    so a read-only disk or a folder without permission is one line, not a failure halfway through."""
    where = run_dir.resolve()
    while not where.exists():
        where = where.parent
    if not where.is_dir() or not files.writable(where):
        raise ToolkitError(f"cannot write the run directory {run_dir}: {where} is not a writable directory "
                           "(read-only disk or no permission); make it writable or choose another --output-dir")


def inspect_for_training(run_dir: Path, overwrite: bool, resume: bool, claim: Claim) -> None:
    """Decide what training may do with an existing directory; raises when the user has to choose."""
    marker = files.read_marker(run_dir)
    is_run = marker is not None and marker.get("kind") == KIND
    if resume:
        if not is_run:
            raise ToolkitError(f"--resume: {run_dir} is not a toolkit run directory; nothing to continue")
        if marker.get("complete"):
            claim.finished = True
            return
        claim.resume_from, claim.skipped = resumable_checkpoint(run_dir)
        if claim.resume_from is None:
            raise ToolkitError(f"--resume: {run_dir} has no complete checkpoint-* folder to continue from; "
                               "start again with --overwrite")
        return
    if not files.entries(run_dir):
        return
    if overwrite:
        files.check_replaceable(run_dir, KIND, "--output-dir")
        return
    if is_run and not marker.get("complete"):
        raise ToolkitError(f"{run_dir} holds an interrupted run; pass --resume to continue it or --overwrite to "
                           "start again")
    raise ToolkitError(f"run directory {run_dir} is not empty; pass --overwrite to replace it or --resume")


@contextmanager
def claimed_run_dir(run_dir: Path, overwrite: bool, resume: bool, check=None):
    """The run directory, checked, locked against a second writer and marked incomplete while training runs.

    `check(claim)`, when given, runs under the lock once the directory has been inspected and before anything in it
    changes (a resume compares its recipe with the run's record there).

    On failure a directory this call created is removed again unless a complete checkpoint is worth keeping; the
    lock is always released. The caller marks the run complete (`finish_run`) once every file is in place.
    """
    if run_dir.exists() and not run_dir.is_dir():
        raise ToolkitError(f"run directory {run_dir} is a file; choose a directory")
    check_writable(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    claim = Claim(run_dir, created)
    try:
        files.acquire_lock(run_dir)
    except BaseException:
        if created:
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    try:
        inspect_for_training(run_dir, overwrite, resume, claim)
        if claim.finished:
            yield claim
            return
        if check is not None:
            check(claim)
        for folder, _ in claim.skipped:
            shutil.rmtree(folder)  # an incomplete checkpoint inside our own run; the Trainer would trip over it
        if overwrite and not resume:
            files.empty_owned(run_dir, KIND, "--output-dir")
        files.write_marker(run_dir, KIND, complete=False)
        yield claim
    except BaseException as err:
        full = isinstance(err, Exception) and not isinstance(err, ToolkitError) and files.disk_full(err, run_dir)
        kept = resumable_checkpoint(run_dir)[0]
        if (claim.created or overwrite) and kept is None and not claim.finished:
            if claim.created:
                shutil.rmtree(run_dir, ignore_errors=True)  # nothing worth keeping: leave no half-made run behind
            else:
                files.empty_owned(run_dir, KIND, "--output-dir")
        if full:
            then = f"continue with --resume (from {kept.name})" if kept else "run it again"
            raise ToolkitError(f"the disk holding {run_dir} is full ({first_line(err)}); free space, then {then}"
                               ) from err
        raise
    finally:
        files.release_lock(run_dir)


def finish_run(run_dir: Path) -> None:
    """Mark the run complete: the last write of a training run, after every file is in place."""
    problem = adapter_file_problem(run_dir / ADAPTER_FILE)
    if problem:
        raise ToolkitError(f"{run_dir}: the saved adapter is not usable ({problem}); the run stays incomplete")
    files.write_marker(run_dir, KIND, complete=True)


def loss_points(log_history: list[dict], key: str = "loss") -> list[tuple[int, float]]:
    return [(entry["step"], entry[key]) for entry in log_history if key in entry]


def plot_loss(log_history: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for key, label in (("loss", "train"), ("eval_loss", "eval")):
        points = loss_points(log_history, key)
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], marker="." if key == "eval_loss" else None,
                    label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with files.staged_file(path) as temporary:
        fig.savefig(temporary, format="png")
    plt.close(fig)


def passes_per_epoch(train) -> int:
    """Passes over the rows in one of the Trainer's epochs: with group_by_length every pass is laid out in one
    dataset the Trainer reads once (toolkit.data.batching), so its epoch counter counts all of them as one."""
    return train.epochs if train.group_by_length else 1


def run_summary(trainer, prepared, result, seconds: float, lora_modules) -> dict:
    history = trainer.state.log_history
    losses = loss_points(history)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    summary = {
        "model": prepared.recipe.model.name,
        "precision": prepared.precision,
        "device": prepared.device.name,
        "quantization": prepared.recipe.quantization.mode,
        "train_rows": len(prepared.train.rows),
        "train_rows_read": len(prepared.train.lengths),
        "train_rows_cut": prepared.train.truncated,
        "train_rows_dropped": prepared.train.dropped,
        "eval_rows": len(prepared.eval.rows),
        "steps": trainer.state.global_step,
        "epochs": round((trainer.state.epoch or 0) * passes_per_epoch(prepared.recipe.train), 3),
        "first_loss": losses[0][1] if losses else None,
        "last_loss": losses[-1][1] if losses else None,
        "train_loss": result.training_loss,
        "seconds": round(seconds, 2),
        "trainable_params": trainable,
        "lora_modules": len(lora_modules),
    }
    evals = loss_points(history, "eval_loss")
    if evals:
        summary["last_eval_loss"] = evals[-1][1]
    if distributed.world_size() > 1:  # what each process ran at each micro-batch: "i" image inputs, "t" text only
        summary["processes"] = distributed.world_size()
        summary["micro_batch_modalities"] = distributed.gather_objects(
            "".join(getattr(trainer, "micro_batch_modalities", [])))
    return summary


def run_card(prepared, summary: dict, run_dir: Path) -> str:
    r = prepared.recipe
    lines = [
        f"# LoRA adapter: {Path(run_dir).name}",
        "",
        f"Base model: `{r.model.name}`, quantization `{r.quantization.mode}`, precision `{prepared.precision}`.",
        f"LoRA r={r.lora.r}, alpha={r.lora.alpha:g}, dropout={r.lora.dropout:g}, "
        f"{summary['lora_modules']} modules ({r.lora.scope} scope), {summary['trainable_params']:,} trainable parameters.",
        f"Data: `{r.data.train}` ({summary['train_rows']} of {summary['train_rows_read']} rows trained, "
        f"{summary['train_rows_cut']} cut to {r.train.max_seq_length} tokens), formatter `{r.data.formatter}`; "
        f"eval rows: {summary['eval_rows']}.",
        f"Trained {summary['steps']} steps ({summary['epochs']} epochs) in {summary['seconds']} s; "
        f"loss {summary['first_loss']} -> {summary['last_loss']}.",
        *resume.resume_lines(Path(run_dir)),
        "",
        "Files: `adapter_model.safetensors` + `adapter_config.json` (the adapter only), tokenizer/processor files, "
        f"`{RECIPE_FILE}` (the resolved recipe), `{resume.START_FILE}` (what the run was started with, and what each "
        f"resume changed), `{METRICS_FILE}`, `{LOSS_PLOT}`.",
        "",
        "```",
        f"toolkit eval {run_dir} --compare-base",
        f"toolkit generate {run_dir} \"다음 건설 용어를 설명하세요.\\n\\n거푸집\"",
        "```",
        "",
    ]
    return "\n".join(lines)


def save_run(trainer, prepared, run_dir: Path, result, seconds: float, lora_modules) -> dict:
    """Write the run's files; every process must call it (sharded models gather on save), only the main writes.
    `lora_modules`: the names PEFT wrapped on the trained model (`toolkit.training.trainer.build_trainer`).

    The run stays marked incomplete until `finish_run`, so a crash in here leaves a run that readers refuse and
    `--resume` completes from its last checkpoint.
    """
    recipe = prepared.recipe
    summary = run_summary(trainer, prepared, result, seconds, lora_modules)
    trainer.save_model(str(run_dir))
    if not trainer.is_world_process_zero():
        return summary
    processor = loading.load_processor(recipe.model.name, recipe.model.revision)
    if processor is not None:
        processor.save_pretrained(run_dir)
        prepared.tokenizer.save_pretrained(run_dir)  # the trained tokenizer (pad token set) wins over the base's
    save_recipe(recipe, run_dir / RECIPE_FILE)
    passes = passes_per_epoch(recipe.train)
    history = [{**e, "epoch": round(e["epoch"] * passes, 4)} if "epoch" in e else e for e in trainer.state.log_history]
    write_json(run_dir / METRICS_FILE, {"summary": summary, "log_history": history})
    plot_loss(trainer.state.log_history, run_dir / LOSS_PLOT)
    files.write_text_atomic(run_dir / "README.md", run_card(prepared, summary, run_dir))
    files.share_like_plain_files(run_dir)
    finish_run(run_dir)
    return summary


def open_run(run_dir: str | Path):
    """The recipe a run was trained with, read back from its directory; a clear error if it is not a finished,
    usable run (interrupted, or its adapter files damaged)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ToolkitError(f"run directory not found: {run_dir}")
    marker = files.read_marker(run_dir)
    if marker is not None and marker.get("kind") == KIND and not marker.get("complete"):
        holder = files.lock_holder(run_dir)
        if holder is not None:
            raise ToolkitError(f"{run_dir} is being trained right now (pid {holder.get('pid', '?')} on "
                               f"{holder.get('host', '?')}); wait for it to finish")
        raise ToolkitError(f"{run_dir} is an interrupted run (training did not finish); "
                           "finish it with toolkit sft RECIPE --output-dir RUN --resume")
    if not (run_dir / RECIPE_FILE).is_file() or not (run_dir / ADAPTER_CONFIG).is_file():
        raise ToolkitError(f"{run_dir} is not a finished run directory (no {RECIPE_FILE} or {ADAPTER_CONFIG})")
    adapter_config = read_adapter_config(run_dir)
    problem = adapter_file_problem(run_dir / ADAPTER_FILE)
    if problem:
        raise ToolkitError(f"{run_dir}: {problem}; the run's adapter is damaged, train it again")
    recipe = load_recipe(run_dir / RECIPE_FILE)
    if not builtin.is_builtin(recipe.model.name):
        return recipe
    trained_on = Path(str(adapter_config.get("base_model_name_or_path", "")))
    if trained_on == builtin.builtin_dir(recipe.model.name):
        return recipe
    if not (trained_on / "config.json").exists():
        raise ToolkitError(f"{run_dir} was trained on an earlier build of {recipe.model.name} that is no longer "
                           f"cached ({trained_on}); train it again")
    # The built-in model changed since this run; its adapter belongs to the build it was trained on.
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"name": str(trained_on)})})


def read_adapter_config(run_dir: Path) -> dict:
    """adapter_config.json as a dict; a one-line error when it is empty, truncated or not PEFT's."""
    path = run_dir / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        raise ToolkitError(f"{path} is not valid JSON; the run's adapter config is damaged, train it again") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ToolkitError(f"{path} is not a PEFT adapter config (no peft_type); the run is damaged, train it again")
    return config


def attach_adapter(run_dir: str | Path, recipe, precision: str, device, quantize: bool = True):
    """The recipe's base model on the device with the run's adapter on top, in eval mode."""
    from peft import PeftModel

    base = loading.load_model(recipe, precision, device, quantize=quantize)
    if device.cuda and (recipe.quantization.mode == "none" or not quantize):
        base = base.to("cuda")  # quantized models are already placed by their device_map
    try:
        model = PeftModel.from_pretrained(base, str(run_dir))
    except (ValueError, KeyError, RuntimeError) as err:
        if "out of memory" in str(err).lower():
            raise
        raise ToolkitError(f"{run_dir}: the adapter does not fit its base model {recipe.model.name} "
                           f"({first_line(err)}); adapter_config.json or the weights were changed, train it again"
                           ) from None
    model.eval()
    return model


def run_tokenizer(run_dir: str | Path):
    """The tokenizer saved with the run (pad token and chat template as trained); a one-line error when its files
    are missing or damaged."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(run_dir))
    except (OSError, ValueError, TypeError) as err:
        raise ToolkitError(f"{run_dir}: the run's tokenizer files cannot be read ({first_line(err)}); copy "
                           "tokenizer.json and tokenizer_config.json from the base model, or train again") from None


def image_inputs(recipe, tokenizer):
    """What reads images for this run's model (None for a text-only model), with the recipe's tile cap."""
    from toolkit.data import vision

    config = loading.load_config(recipe.model.name, recipe.model.revision)
    return vision.image_inputs_for(recipe.model.name, recipe.model.revision, config, tokenizer,
                                   recipe.data.max_image_tiles, recipe.data.vision_tiles)


def load_trained(run_dir: str | Path, quantize: bool = True):
    """Base model + the run's adapter, loaded the way the run was trained; returns (model, tokenizer, recipe).

    `quantize=False` loads the base unquantized (in the run's precision) even if training used 8-bit or 4-bit.
    """
    from toolkit.config.precision import resolve_precision

    recipe = open_run(run_dir)
    tokenizer = run_tokenizer(run_dir)  # before the model: damaged files fail in a second, not after loading
    device = loading.detect_accelerator()
    precision = resolve_precision(recipe.train.precision, device)
    model = attach_adapter(run_dir, recipe, precision, device, quantize)
    return model, tokenizer, recipe
