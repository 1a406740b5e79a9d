"""Turning a prepared plan into a trained run directory: the order rows are trained in, one modality per step
across processes, the trainer built and run, the run directory claimed, recorded and saved. `toolkit sft` adds its
arguments, several processes and several machines; `toolkit.api.train` calls `train_into` for one process."""

from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path

from rich.markup import escape

from toolkit.data import vision
from toolkit.data.batching import length_grouped_order, shared_modality_batches
from toolkit.errors import ToolkitError
from toolkit.model import lora
from toolkit.runs import resume, rundir
from toolkit.training import distributed, memory, samples, trainer
from toolkit.ui.report import console, show


def training_order(prepared) -> list[int]:
    """Indices of the encoded rows in the order they are trained: as given (the Trainer shuffles), or grouped by
    length into this process's micro-batches."""
    settings = prepared.recipe.train
    indices = list(range(len(prepared.train.rows)))
    if not settings.group_by_length:
        return indices
    micro_batch, _ = distributed.per_process_batch(settings.batch_size, settings.grad_accum, distributed.world_size())
    with_images = list(prepared.train.image_flags)
    return length_grouped_order(prepared.lengths, micro_batch, settings.epochs, settings.seed, apart=with_images)


def shared_batches(prepared, processes: int) -> list[list[int]] | None:
    """With several processes and train rows both with and without images: the micro-batches, round by round, so
    that each step is an image step on every process or a text step on every process
    (`toolkit.data.batching.shared_modality_batches`); None where every step is one modality anyway."""
    with_images = list(prepared.train.image_flags) if processes > 1 else []
    if processes == 1 or len(set(with_images)) != 2:
        return None
    settings = prepared.recipe.train
    micro_batch, _ = distributed.per_process_batch(settings.batch_size, settings.grad_accum, processes)
    lengths = prepared.lengths if settings.group_by_length else None
    try:
        return shared_modality_batches(with_images, micro_batch, processes, settings.epochs, settings.seed, lengths)
    except ValueError as err:
        raise ToolkitError(f"--gpus {processes}: {err}; every process needs an image in an image step and the "
                           "toolkit adds no fake ones: add image rows, train on fewer GPUs, or leave the image rows "
                           "out") from None


def mixed(encoding) -> bool:
    return len(set(encoding.image_flags)) == 2


def check_shared_steps(prepared, processes: int, strategy: str) -> None:
    """Before any process starts: the train rows can be dealt so every step is one modality on every process, and
    no sharded evaluation would mix them (the Trainer deals eval rows itself, so one process could run the vision
    tower's sharded weights alone and wait forever)."""
    shared_batches(prepared, processes)
    if strategy != "ddp" and prepared.recipe.train.eval_steps and mixed(prepared.eval):
        raise ToolkitError(f"--strategy {strategy} evaluates rows with and without images in the same step on "
                           "different processes, which hangs a sharded model; set train.eval_steps=null (then run "
                           "toolkit eval on the finished run), use --strategy ddp, or give data.eval one kind of row")
    if strategy == "fsdp" and not prepared.device.cuda:
        console.print("note: without GPUs accelerate runs --strategy fsdp as plain data-parallel (DDP) processes")


def train(prepared, run_dir: Path, resume_from: Path | None, strategy: str = "ddp"):
    """Build the trainer for the plan and train; returns (trainer, its result, seconds, the module names PEFT
    wrapped on the loaded model), the last for the run's record: the plan's own list was checked on a weightless
    model, and the plan is not changed."""
    recipe = prepared.recipe
    batches = shared_batches(prepared, distributed.world_size())
    train_set = prepared.train.dataset(None if batches else training_order(prepared))
    eval_set = prepared.eval.dataset() if len(prepared.eval.rows) else None
    guard = trainer.FiniteGuard(prepared.precision)
    collator, settings = None, {}
    if prepared.train.image_rows or prepared.eval.image_rows:
        collator = vision.training_collator(recipe, prepared.model_config, prepared.tokenizer, prepared.precision)
        settings["image_loader_workers"] = vision.loader_workers(recipe, collator.images)
    if batches:
        settings["num_train_epochs"] = 1  # the batches hold every pass
    built, modules = trainer.build_trainer(
        recipe, precision=prepared.precision, device=prepared.device, tokenizer=prepared.tokenizer,
        train_dataset=train_set, eval_dataset=eval_set, output_dir=str(run_dir), strategy=strategy,
        callbacks=[trainer.RichProgressCallback(), guard], data_collator=collator, **settings,
    )
    built.shared_batches = batches
    samples.attach(built, prepared, strategy)  # train.sample_every: answers during training
    show_placement(built.model, prepared.train)
    started = time.time()
    result = trainer.run_training(built, recipe, prepared.precision, strategy, resume_from)
    if guard.problem:
        raise ToolkitError(f"training diverged: {guard.problem}; no finished run was written (checkpoints before "
                           f"that step are kept in {run_dir}). Lower train.learning_rate (now "
                           f"{recipe.train.learning_rate:g}) or check lora.alpha and the data")
    return built, result, time.time() - started, modules


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


def report_changes(changes: dict) -> None:
    if changes:
        listed = ", ".join(f"{key} {resume.shown(old)} -> {resume.shown(new)}" for key, (old, new) in changes.items())
        console.print(f"[yellow]note:[/] this resume changes {escape(listed)} (nothing that changes what is "
                      f"learned); recorded in {resume.START_FILE} and the run card", soft_wrap=True)


def train_and_save(prepared, run_dir: Path, resume_from: Path | None, strategy: str) -> None:
    built, result, seconds, modules = train(prepared, run_dir, resume_from, strategy)
    summary = rundir.save_run(built, prepared, run_dir, result, seconds, modules)
    show("Training done", ["metric", "value"],
         [[k, v] for k, v in summary.items() if not isinstance(v, (dict, list))])
    console.print(f"Adapter and run files in [bold]{escape(str(run_dir))}[/]. "
                  f"Next: toolkit eval {escape(str(run_dir))} --compare-base", soft_wrap=True)


def start_record_steps(prepared, processes: int, strategy: str, run_dir: Path):
    """What a run is started with (`toolkit.runs.resume`): the check a resume must pass before the run directory changes
    and any model loads, and what to write once the directory is claimed (the record, or what the resume changed)."""
    started = resume.start_record(prepared, processes, strategy)
    changes = {}

    def same_run(claim) -> None:
        if claim.resume_from:
            changes.update(resume.check(run_dir, started, claim.resume_from))

    def write(claim) -> None:
        if claim.resume_from:
            resume.record(run_dir, changes, claim.resume_from)
            report_changes(changes)
        else:
            resume.write_start(run_dir, started)

    return same_run, write


@contextmanager
def claimed_by_rank_zero(run_dir: Path, overwrite: bool, resume: bool, wait_s: float, check=None):
    """The run directory claimed by the global rank 0 (checked, locked, marked incomplete) for a job that no
    toolkit process launched on this machine holds; every other rank waits for rank 0's decision (or its refusal)
    through torchrun's store, so all of them resume from the same checkpoint or stop together."""
    if not distributed.is_main_process():
        outcome = distributed.claim_outcome(wait_s)
        if "error" in outcome:
            raise ToolkitError(outcome["error"])
        resume_from = Path(outcome["resume_from"]) if outcome.get("resume_from") else None
        yield rundir.Claim(run_dir, created=False, resume_from=resume_from, finished=outcome["finished"])
        return
    shared = False
    try:
        with rundir.claimed_run_dir(run_dir, overwrite, resume, check=check) as claim:
            distributed.share_claim_outcome({"finished": claim.finished, "resume_from":
                                             str(claim.resume_from) if claim.resume_from else None})
            shared = True
            yield claim
    except BaseException as err:
        if not shared:
            message = str(err) if isinstance(err, ToolkitError) else f"rank 0 stopped ({type(err).__name__})"
            distributed.share_claim_outcome({"error": message})
        raise


def train_into(prepared, run_dir: Path, overwrite: bool = False, resume: bool = False, processes: int = 1,
               strategy: str = "ddp", launch=None):
    """Claim `run_dir` (checked, locked, marked incomplete; `overwrite` and `resume` as `toolkit sft` has them),
    record what the run starts with (or check that a resume changes nothing that is learned), then train and save
    in this process, or call `launch()` to start the training processes, and return what it returns. A finished
    run with `resume` is left as it is."""
    memory.check_host_memory(prepared, processes)  # before the run directory is touched
    same_run, write = start_record_steps(prepared, processes, strategy, run_dir)
    with rundir.claimed_run_dir(run_dir, overwrite, resume, check=same_run) as claim:
        if claim.finished:
            console.print(f"{escape(str(run_dir))} is a finished run; --resume only continues an interrupted one, "
                          "so nothing was trained (start a new run to train longer)", soft_wrap=True)
            return None
        report_resume(claim)
        write(claim)
        if launch is not None:
            return launch()
        train_and_save(prepared, run_dir, claim.resume_from, strategy)
    return None
