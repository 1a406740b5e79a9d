"""`toolkit sft RECIPE`: LoRA fine-tuning through TRL's SFTTrainer, into a self-describing run directory."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from toolkit import distributed, modeling, runs
from toolkit.batching import length_grouped_order
from toolkit.errors import ToolkitError
from toolkit.prepare import prepare, show_plan
from toolkit.recipe import load_recipe
from toolkit.report import console, show
from toolkit.translate import to_sft_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolkit sft", description="Fine-tune with LoRA as the recipe says.")
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set train.max_steps=5 (repeatable)")
    parser.add_argument("--output-dir", help="run directory (overrides output_dir)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    group.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    parser.add_argument("--gpus", type=int, default=1, metavar="N",
                        help="train data-parallel on N GPUs (N CPU processes where there is no GPU)")
    parser.add_argument("--strategy", choices=distributed.STRATEGIES, default="ddp",
                        help="with --gpus: ddp (replicas), fsdp or zero3 (sharded; zero3 needs deepspeed)")
    return parser


def check_run_dir(run_dir: Path, overwrite: bool, resume: bool) -> None:
    """Never clobber a finished run by accident; check writability before any slow work."""
    exists = run_dir.exists() and any(run_dir.iterdir())
    if resume:
        if not runs.last_checkpoint(run_dir):
            raise ToolkitError(f"--resume: no checkpoint-* folder in {run_dir} to continue from")
        return
    if exists and not overwrite:
        raise ToolkitError(f"run directory {run_dir} is not empty; pass --overwrite to replace it or --resume")
    parent = run_dir.resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not runs.writable(parent):
        raise ToolkitError(f"cannot write the run directory {run_dir}: {parent} is not writable")


def training_order(prepared) -> list:
    """The rows in the order they are trained: as given (the Trainer shuffles), or grouped by length."""
    rows, settings = prepared.train_rows, prepared.recipe.train
    if not settings.group_by_length:
        return rows
    micro_batch, _ = distributed.per_process_batch(settings.batch_size, settings.grad_accum, distributed.world_size())
    order = length_grouped_order(prepared.lengths, micro_batch, settings.epochs, settings.seed)
    return [rows[i] for i in order]


def train(prepared, run_dir: Path, resume: bool, strategy: str = "ddp"):
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTTrainer

    from toolkit import data

    recipe = prepared.recipe
    model = modeling.load_model(recipe, prepared.precision, prepared.device)
    prepared.lora_modules = modeling.check_lora_targets(model, recipe.lora, prepared.lora_config)
    train_set = data.to_dataset(training_order(prepared), recipe.data)
    eval_set = data.to_dataset(prepared.eval_rows, recipe.data) if prepared.eval_rows else None
    args = to_sft_config(
        recipe.train, prepared.precision, prepared.device, str(run_dir), eval_set is not None, recipe.data.too_long,
        distributed.world_size(), strategy,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=prepared.tokenizer,
        peft_config=prepared.lora_config,
        callbacks=[runs.RichProgressCallback()],
    )
    trainer.remove_callback(PrinterCallback)  # the rich bar shows progress; raw log dicts would only add noise
    modeling.adapters_for_mixed_precision(trainer.model, prepared.precision, recipe.lora.upcast_inputs)
    show_placement(trainer.model)
    started = time.time()
    result = trainer.train(resume_from_checkpoint=True if resume else None)
    return trainer, result, time.time() - started


def show_placement(model) -> None:
    counts = modeling.trainable_by_tower(model)
    total = sum(p.numel() for p in model.parameters())
    rows = [[tower, n] for tower, n in sorted(counts.items())]
    rows.append(["all trainable", sum(counts.values())])
    rows.append(["share of model", f"{100 * sum(counts.values()) / max(total, 1):.3f}%"])
    show("Where the LoRA adapters sit (trainable parameters)", ["part", "params"], rows)
    if counts.get("cross-attention"):
        console.print("note: cross-attention layers only run for rows with an image; on text rows their "
                      f"{counts['cross-attention']:,} adapter parameters stay at their initial values")


def claim_run_dir(run_dir: Path, overwrite: bool, resume: bool) -> bool:
    """Check and (with --overwrite) clear the run directory; True when this call will create it."""
    check_run_dir(run_dir, overwrite, resume)
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    return not run_dir.exists()


def run(recipe, run_dir: Path, overwrite: bool, resume: bool, strategy: str = "ddp") -> Path:
    prepared = prepare(recipe)
    show_plan(prepared)
    main_process = distributed.is_main_process()
    created = claim_run_dir(run_dir, overwrite, resume) if main_process else False
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        trainer, result, seconds = train(prepared, run_dir, resume, strategy)
    except BaseException:
        if created and not runs.last_checkpoint(run_dir):
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing worth keeping: leave no half-made run behind
        raise
    summary = runs.save_run(trainer, prepared, run_dir, result, seconds)
    show("Training done", ["metric", "value"], [[k, v] for k, v in summary.items() if not isinstance(v, dict)])
    console.print(f"Adapter and run files in [bold]{run_dir}[/]. Next: toolkit eval {run_dir} --compare-base")
    return run_dir


def launch_workers(args, recipe) -> int:
    """Check what can be checked once, then start one training process per GPU under torch.distributed.run."""
    run_dir = Path(recipe.output_dir)
    prepare(recipe)  # recipe, data and targets fail here, once, instead of in every process
    claim_run_dir(run_dir, args.overwrite, args.resume)
    worker = ["sft", args.recipe, *(f"--set={o}" for o in args.overrides), "--output-dir", str(run_dir),
              "--strategy", args.strategy, *(["--resume"] if args.resume else [])]
    console.print(f"starting {args.gpus} training processes ({args.strategy})")
    return 0 if distributed.launch(worker, args.gpus) == 0 else 1


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    if args.output_dir:
        recipe = recipe.model_copy(update={"output_dir": args.output_dir})
    if args.gpus > 1 and distributed.world_size() == 1:
        return launch_workers(args, recipe)
    run(recipe, Path(recipe.output_dir), args.overwrite, args.resume, args.strategy)
    return 0
