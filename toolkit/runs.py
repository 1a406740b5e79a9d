"""The run directory: what a training run leaves behind, and how later commands read it back."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from transformers import TrainerCallback

from toolkit import builtin, modeling
from toolkit.errors import ToolkitError
from toolkit.recipe import RECIPE_FILE, load_recipe, save_recipe
from toolkit.report import progress_bar, write_json

METRICS_FILE = "metrics.json"
LOSS_PLOT = "loss.png"


def last_checkpoint(run_dir: Path) -> Path | None:
    if not run_dir.is_dir():
        return None
    found = [p for p in run_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[-1]), default=None)


def writable(folder: Path) -> bool:
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


class RichProgressCallback(TrainerCallback):
    """A rich progress bar over optimizer steps, showing the latest loss; only the main process draws it."""

    def __init__(self):
        self.progress = None
        self.task = None

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.progress = progress_bar()
            self.task = self.progress.add_task("training", total=state.max_steps, status="", completed=state.global_step)
            self.progress.start()

    def on_step_end(self, args, state, control, **kwargs):
        if self.progress:
            self.progress.update(self.task, completed=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.progress and logs:
            parts = [f"{k} {logs[k]:.4f}" for k in ("loss", "eval_loss") if k in logs]
            if parts:
                self.progress.update(self.task, status=" ".join(parts))

    def on_train_end(self, args, state, control, **kwargs):
        if self.progress:
            self.progress.stop()
            self.progress = None


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
    fig.savefig(path)
    plt.close(fig)


def run_summary(trainer, prepared, result, seconds: float) -> dict:
    history = trainer.state.log_history
    losses = loss_points(history)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    summary = {
        "model": prepared.recipe.model.name,
        "precision": prepared.precision,
        "device": prepared.device.name,
        "quantization": prepared.recipe.quantization.mode,
        "train_rows": len(prepared.train_rows),
        "eval_rows": len(prepared.eval_rows),
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 3),
        "first_loss": losses[0][1] if losses else None,
        "last_loss": losses[-1][1] if losses else None,
        "train_loss": result.training_loss,
        "seconds": round(seconds, 2),
        "trainable_params": trainable,
        "lora_modules": len(prepared.lora_modules),
    }
    evals = loss_points(history, "eval_loss")
    if evals:
        summary["last_eval_loss"] = evals[-1][1]
    return summary


def run_card(prepared, summary: dict, run_dir: Path) -> str:
    r = prepared.recipe
    lines = [
        f"# LoRA adapter: {Path(run_dir).name}",
        "",
        f"Base model: `{r.model.name}`, quantization `{r.quantization.mode}`, precision `{prepared.precision}`.",
        f"LoRA r={r.lora.r}, alpha={r.lora.alpha:g}, dropout={r.lora.dropout:g}, "
        f"{summary['lora_modules']} modules ({r.lora.scope} scope), {summary['trainable_params']:,} trainable parameters.",
        f"Data: `{r.data.train}` ({summary['train_rows']} rows), formatter `{r.data.formatter}`; "
        f"eval rows: {summary['eval_rows']}.",
        f"Trained {summary['steps']} steps ({summary['epochs']} epochs) in {summary['seconds']} s; "
        f"loss {summary['first_loss']} -> {summary['last_loss']}.",
        "",
        "Files: `adapter_model.safetensors` + `adapter_config.json` (the adapter only), tokenizer/processor files, "
        f"`{RECIPE_FILE}` (the resolved recipe), `{METRICS_FILE}`, `{LOSS_PLOT}`.",
        "",
        "```",
        f"toolkit eval {run_dir} --compare-base",
        f"toolkit generate {run_dir} \"다음 건설 용어를 설명하세요.\\n\\n거푸집\"",
        "```",
        "",
    ]
    return "\n".join(lines)


def save_run(trainer, prepared, run_dir: Path, result, seconds: float) -> dict:
    """Write the run's files; every process must call it (sharded models gather on save), only the main writes."""
    recipe = prepared.recipe
    summary = run_summary(trainer, prepared, result, seconds)
    trainer.save_model(str(run_dir))
    if not trainer.is_world_process_zero():
        return summary
    processor = modeling.load_processor(recipe.model.name, recipe.model.revision)
    if processor is not None:
        processor.save_pretrained(run_dir)
        prepared.tokenizer.save_pretrained(run_dir)  # the trained tokenizer (pad token set) wins over the base's
    save_recipe(recipe, run_dir / RECIPE_FILE)
    write_json(run_dir / METRICS_FILE, {"summary": summary, "log_history": trainer.state.log_history})
    plot_loss(trainer.state.log_history, run_dir / LOSS_PLOT)
    (run_dir / "README.md").write_text(run_card(prepared, summary, run_dir), encoding="utf-8")
    return summary


def open_run(run_dir: str | Path):
    """The recipe a run was trained with, read back from its directory; a clear error if it is not a run."""
    run_dir = Path(run_dir)
    if not (run_dir / RECIPE_FILE).is_file() or not (run_dir / "adapter_config.json").is_file():
        raise ToolkitError(f"{run_dir} is not a finished run directory (no {RECIPE_FILE} or adapter_config.json)")
    recipe = load_recipe(run_dir / RECIPE_FILE)
    if not builtin.is_builtin(recipe.model.name):
        return recipe
    trained_on = Path(json.loads((run_dir / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"])
    if trained_on == builtin.builtin_dir(recipe.model.name):
        return recipe
    if not (trained_on / "config.json").exists():
        raise ToolkitError(f"{run_dir} was trained on an earlier build of {recipe.model.name} that is no longer "
                           f"cached ({trained_on}); train it again")
    # The built-in model changed since this run; its adapter belongs to the build it was trained on.
    return recipe.model_copy(update={"model": recipe.model.model_copy(update={"name": str(trained_on)})})



def attach_adapter(run_dir: str | Path, recipe, precision: str, device, quantize: bool = True):
    """The recipe's base model on the device with the run's adapter on top, in eval mode."""
    from peft import PeftModel

    base = modeling.load_model(recipe, precision, device, quantize=quantize)
    if device.cuda and (recipe.quantization.mode == "none" or not quantize):
        base = base.to("cuda")  # quantized models are already placed by their device_map
    model = PeftModel.from_pretrained(base, str(run_dir))
    model.eval()
    return model


def load_trained(run_dir: str | Path, quantize: bool = True):
    """Base model + the run's adapter, loaded the way the run was trained; returns (model, tokenizer, recipe).

    `quantize=False` loads the base unquantized (in the run's precision) even if training used 8-bit or 4-bit.
    """
    from transformers import AutoTokenizer

    from toolkit.translate import resolve_precision

    recipe = open_run(run_dir)
    device = modeling.detect_accelerator()
    precision = resolve_precision(recipe.train.precision, device)
    model = attach_adapter(run_dir, recipe, precision, device, quantize)
    tokenizer = AutoTokenizer.from_pretrained(str(run_dir))
    return model, tokenizer, recipe
