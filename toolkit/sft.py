"""`toolkit sft RECIPE`: LoRA fine-tuning through TRL's SFTTrainer, into a self-describing run directory."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.markup import escape

from toolkit import distributed, files, modeling, runs
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


def training_order(prepared) -> list:
    """The rows in the order they are trained: as given (the Trainer shuffles), or grouped by length."""
    rows, settings = prepared.train_rows, prepared.recipe.train
    if not settings.group_by_length:
        return rows
    micro_batch, _ = distributed.per_process_batch(settings.batch_size, settings.grad_accum, distributed.world_size())
    order = length_grouped_order(prepared.lengths, micro_batch, settings.epochs, settings.seed)
    return [rows[i] for i in order]


def train(prepared, run_dir: Path, resume_from: Path | None, strategy: str = "ddp"):
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
    guard = runs.FiniteGuard(prepared.precision)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_set,
        eval_dataset=eval_set,
        processing_class=prepared.tokenizer,
        peft_config=prepared.lora_config,
        callbacks=[runs.RichProgressCallback(), guard],
    )
    trainer.remove_callback(PrinterCallback)  # the rich bar shows progress; raw log dicts would only add noise
    modeling.adapters_for_mixed_precision(trainer.model, prepared.precision, recipe.lora.upcast_inputs)
    show_placement(trainer.model)
    started = time.time()
    result = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    if guard.problem:
        raise ToolkitError(f"training diverged: {guard.problem}; no finished run was written (checkpoints before "
                           f"that step are kept in {run_dir}). Lower train.learning_rate (now "
                           f"{recipe.train.learning_rate:g}) or check lora.alpha and the data")
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


def report_resume(claim) -> None:
    for folder, problem in claim.skipped:
        console.print(f"[yellow]note:[/] skipped {escape(str(folder))}: incomplete ({escape(problem)}), "
                      "probably a crash while it was saved; removed", soft_wrap=True)
    if claim.resume_from:
        console.print(f"resuming from {escape(str(claim.resume_from))}", soft_wrap=True)


def train_and_save(prepared, run_dir: Path, resume_from: Path | None, strategy: str) -> None:
    trainer, result, seconds = train(prepared, run_dir, resume_from, strategy)
    summary = runs.save_run(trainer, prepared, run_dir, result, seconds)
    show("Training done", ["metric", "value"], [[k, v] for k, v in summary.items() if not isinstance(v, dict)])
    console.print(f"Adapter and run files in [bold]{escape(str(run_dir))}[/]. "
                  f"Next: toolkit eval {escape(str(run_dir))} --compare-base", soft_wrap=True)


def launch_workers(args, recipe, run_dir: Path, claim) -> int:
    """Start one training process per GPU under torch.distributed.run; this process keeps the run's lock."""
    worker = ["sft", args.recipe, *(f"--set={o}" for o in args.overrides), "--output-dir", str(run_dir),
              "--strategy", args.strategy, *(["--resume"] if args.resume else [])]
    console.print(f"starting {args.gpus} training processes ({args.strategy})")
    code = distributed.launch(worker, args.gpus)
    if code != 0 or not files.is_complete(run_dir, runs.KIND):
        raise ToolkitError(f"a training process failed (exit code {code}); {run_dir} is left incomplete")
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    run_dir = files.expand(args.output_dir or recipe.output_dir)
    recipe = recipe.model_copy(update={"output_dir": str(run_dir)})
    prepared = prepare(recipe)  # recipe, data and targets fail here, before the run directory is touched
    if distributed.world_size() > 1:  # a worker started by launch_workers, which holds the run directory
        resume_from = runs.resumable_checkpoint(run_dir)[0] if args.resume else None
        train_and_save(prepared, run_dir, resume_from, args.strategy)
        return 0
    show_plan(prepared)
    with runs.claimed_run_dir(run_dir, args.overwrite, args.resume) as claim:
        if claim.finished:
            console.print(f"{escape(str(run_dir))} is a finished run; --resume only continues an interrupted one, "
                          "so nothing was trained (start a new run to train longer)", soft_wrap=True)
            return 0
        report_resume(claim)
        if args.gpus > 1:
            return launch_workers(args, recipe, run_dir, claim)
        train_and_save(prepared, run_dir, claim.resume_from, args.strategy)
    return 0
