"""`toolkit sft RECIPE`: LoRA fine-tuning through TRL's SFTTrainer, into a self-describing run directory."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.markup import escape

from toolkit import activations, data, distributed, files, lora, memory, runs, sampling, trainer, vision
from toolkit.batching import length_grouped_order, shared_modality_batches
from toolkit.commands.common import add_recipe_arguments, positive_int
from toolkit.errors import ToolkitError
from toolkit.prepare import prepare, show_plan
from toolkit.recipe import load_recipe
from toolkit.report import console, show


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolkit sft", description="Fine-tune with LoRA as the recipe says.")
    add_recipe_arguments(parser)
    parser.add_argument("--output-dir", help="run directory (overrides output_dir)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--overwrite", action="store_true", help="replace an existing run directory the toolkit made")
    group.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    parser.add_argument("--gpus", type=positive_int, default=1, metavar="N",
                        help="train data-parallel on N GPUs (N CPU processes where there is no GPU)")
    parser.add_argument("--strategy", choices=distributed.STRATEGIES, default="ddp",
                        help="with --gpus: ddp (replicas), fsdp or zero3 (sharded; zero3 needs deepspeed)")
    return parser


def training_order(prepared) -> list[int]:
    """Indices of the encoded rows in the order they are trained: as given (the Trainer shuffles), or grouped by
    length into this process's micro-batches."""
    settings = prepared.recipe.train
    indices = list(range(len(prepared.train.examples)))
    if not settings.group_by_length:
        return indices
    micro_batch, _ = distributed.per_process_batch(settings.batch_size, settings.grad_accum, distributed.world_size())
    with_images = [bool(e.images) for e in prepared.train.examples]
    return length_grouped_order(prepared.lengths, micro_batch, settings.epochs, settings.seed, apart=with_images)


def shared_batches(prepared, processes: int) -> list[list[int]] | None:
    """With several processes and train rows both with and without images: the micro-batches, round by round, so
    that each step is an image step on every process or a text step on every process
    (`toolkit.batching.shared_modality_batches`); None where every step is one modality anyway."""
    if processes == 1 or not mixed(prepared.train.examples):
        return None
    with_images = [bool(e.images) for e in prepared.train.examples]
    settings = prepared.recipe.train
    micro_batch, _ = distributed.per_process_batch(settings.batch_size, settings.grad_accum, processes)
    lengths = prepared.lengths if settings.group_by_length else None
    try:
        return shared_modality_batches(with_images, micro_batch, processes, settings.epochs, settings.seed, lengths)
    except ValueError as err:
        raise ToolkitError(f"--gpus {processes}: {err}; every process needs an image in an image step and the "
                           "toolkit adds no fake ones: add image rows, train on fewer GPUs, or leave the image rows "
                           "out") from None


def mixed(examples) -> bool:
    return len({bool(e.images) for e in examples}) == 2


def check_shared_steps(prepared, processes: int, strategy: str) -> None:
    """Before any process starts: the train rows can be dealt so every step is one modality on every process, and
    no sharded evaluation would mix them (the Trainer deals eval rows itself, so one process could run the vision
    tower's sharded weights alone and wait forever)."""
    shared_batches(prepared, processes)
    if strategy != "ddp" and prepared.recipe.train.eval_steps and mixed(prepared.eval.examples):
        raise ToolkitError(f"--strategy {strategy} evaluates rows with and without images in the same step on "
                           "different processes, which hangs a sharded model; set train.eval_steps=null (then run "
                           "toolkit eval on the finished run), use --strategy ddp, or give data.eval one kind of row")
    if strategy == "fsdp" and not prepared.device.cuda:
        console.print("note: without GPUs accelerate runs --strategy fsdp as plain data-parallel (DDP) processes")


def train(prepared, run_dir: Path, resume_from: Path | None, strategy: str = "ddp"):
    recipe = prepared.recipe
    examples = prepared.train.examples
    batches = shared_batches(prepared, distributed.world_size())
    train_set = data.to_dataset(examples if batches else [examples[i] for i in training_order(prepared)])
    eval_set = data.to_dataset(prepared.eval.examples) if prepared.eval.examples else None
    guard = trainer.FiniteGuard(prepared.precision)
    collator, settings = None, {}
    if prepared.train.image_rows or prepared.eval.image_rows:
        collator, settings = vision.training_collator(recipe, prepared.model_config, prepared.tokenizer,
                                                      prepared.precision)
    if batches:
        settings["num_train_epochs"] = 1  # the batches hold every pass
    built, prepared.lora_modules = trainer.build_trainer(
        recipe, precision=prepared.precision, device=prepared.device, tokenizer=prepared.tokenizer,
        train_dataset=train_set, eval_dataset=eval_set, output_dir=str(run_dir), strategy=strategy,
        callbacks=[trainer.RichProgressCallback(), guard], data_collator=collator, **settings,
    )
    built.shared_batches = batches
    sampling.attach(built, prepared, strategy)  # train.sample_every: answers during training
    show_placement(built.model, prepared.train)
    started = time.time()
    result = trainer.run_training(built, recipe, prepared.precision, strategy, resume_from)
    if guard.problem:
        raise ToolkitError(f"training diverged: {guard.problem}; no finished run was written (checkpoints before "
                           f"that step are kept in {run_dir}). Lower train.learning_rate (now "
                           f"{recipe.train.learning_rate:g}) or check lora.alpha and the data")
    return built, result, time.time() - started


def trained_by(part: str, encoding) -> str:
    """Which rows can train a part's adapters: cross-attention and the vision tower only run for image rows."""
    if part in ("cross-attention", "vision"):
        rows = encoding.image_rows
        return f"image rows only ({rows} of {len(encoding.rows)})" if rows else "nothing: no row has an image"
    return f"every row ({len(encoding.rows)})"


def show_placement(model, encoding) -> None:
    counts = lora.trainable_by_part(model)
    total = sum(p.numel() for p in model.parameters())
    rows = [[part, n, trained_by(part, encoding)] for part, n in sorted(counts.items())]
    rows.append(["all trainable", sum(counts.values()), ""])
    rows.append(["share of model", f"{100 * sum(counts.values()) / max(total, 1):.3f}%", ""])
    show("Where the LoRA adapters sit (trainable parameters)", ["part", "params", "trained by"], rows)
    idle = [part for part in ("cross-attention", "vision") if counts.get(part) and not encoding.image_rows]
    if idle:
        console.print(f"note: {' and '.join(idle)} adapters only learn from rows with an image and this data has "
                      "none, so they stay at their initial values")


def report_resume(claim) -> None:
    for folder, problem in claim.skipped:
        console.print(f"[yellow]note:[/] skipped {escape(str(folder))}: incomplete ({escape(problem)}), "
                      "probably a crash while it was saved; removed", soft_wrap=True)
    if claim.resume_from:
        console.print(f"resuming from {escape(str(claim.resume_from))}", soft_wrap=True)


def train_and_save(prepared, run_dir: Path, resume_from: Path | None, strategy: str) -> None:
    built, result, seconds = train(prepared, run_dir, resume_from, strategy)
    summary = runs.save_run(built, prepared, run_dir, result, seconds)
    show("Training done", ["metric", "value"],
         [[k, v] for k, v in summary.items() if not isinstance(v, (dict, list))])
    console.print(f"Adapter and run files in [bold]{escape(str(run_dir))}[/]. "
                  f"Next: toolkit eval {escape(str(run_dir))} --compare-base", soft_wrap=True)


def launch_workers(args, run_dir: Path) -> int:
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
    if args.output_dir is not None and not args.output_dir.strip():
        raise ToolkitError("--output-dir is empty; give the run directory")
    run_dir = files.expand(args.output_dir or recipe.output_dir)
    recipe = recipe.model_copy(update={"output_dir": str(run_dir)})
    prepared = prepare(recipe)  # recipe, data and targets fail here, before the run directory is touched
    activations.check_strategy(recipe.train, args.strategy)
    auto = {key: getattr(recipe.train, key) == "auto" for key in ("batch_size", "checkpoint_layers")}
    prepared.recipe, plan = memory.memory_plan(prepared)  # the auto settings become numbers here
    if plan:
        resolved = [f"train.{key}: auto -> {getattr(prepared.recipe.train, key)}" for key, on in auto.items() if on]
        console.print("; ".join(resolved + [f"memory: {memory.plan_note(plan, prepared.recipe)}"]), soft_wrap=True)
    if distributed.world_size() > 1:  # a worker started by launch_workers, which holds the run directory
        resume_from = runs.resumable_checkpoint(run_dir)[0] if args.resume else None
        train_and_save(prepared, run_dir, resume_from, args.strategy)
        return 0
    show_plan(prepared)
    if args.gpus > 1:
        check_shared_steps(prepared, args.gpus, args.strategy)
    with runs.claimed_run_dir(run_dir, args.overwrite, args.resume) as claim:
        if claim.finished:
            console.print(f"{escape(str(run_dir))} is a finished run; --resume only continues an interrupted one, "
                          "so nothing was trained (start a new run to train longer)", soft_wrap=True)
            return 0
        report_resume(claim)
        if args.gpus > 1:
            return launch_workers(args, run_dir)
        train_and_save(prepared, run_dir, claim.resume_from, args.strategy)
    return 0
