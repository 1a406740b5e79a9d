"""`toolkit sft RECIPE`: LoRA fine-tuning through TRL's SFTTrainer, into a self-describing run directory."""

from __future__ import annotations

import argparse
import os
import time
from contextlib import contextmanager
from pathlib import Path

from rich.markup import escape

from toolkit.commands.common import add_recipe_arguments, non_negative_int, positive_int
from toolkit.config.recipe import load_recipe
from toolkit.data import vision
from toolkit.data.batching import length_grouped_order, shared_modality_batches
from toolkit.errors import ToolkitError
from toolkit.io import files
from toolkit.model import lora
from toolkit.runs import resume, rundir
from toolkit.training import activations, distributed, memory, samples, trainer
from toolkit.training.prepare import prepare, show_plan
from toolkit.ui.report import console, show


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
    nodes = parser.add_argument_group("several machines (run the same command on every node)")
    nodes.add_argument("--nodes", type=positive_int, default=1, metavar="N", help="machines in the job")
    nodes.add_argument("--node-rank", type=non_negative_int, default=None, metavar="R",
                       help="this machine's place, 0 to N-1 (0 holds the rendezvous and writes the run)")
    nodes.add_argument("--master-addr", default=None, metavar="HOST", help="node 0's address every node can reach")
    nodes.add_argument("--master-port", type=port_number, default=29500, metavar="PORT",
                       help="node 0's rendezvous port (default 29500)")
    nodes.add_argument("--join-timeout", type=positive_int, default=distributed.DEFAULT_JOIN_TIMEOUT, metavar="S",
                       help=f"seconds to wait for the other nodes (default {distributed.DEFAULT_JOIN_TIMEOUT})")
    return parser


def port_number(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port (1-65535), got {text}")
    return value


def rendezvous_of(args) -> distributed.Rendezvous | None:
    """The rendezvous `--nodes` asks for (None for one machine); refuses an incomplete or contradictory set."""
    if args.nodes == 1:
        if args.node_rank not in (None, 0) or args.master_addr:
            raise ToolkitError("--node-rank and --master-addr need --nodes N (the number of machines, 2 or more)")
        return None
    if args.node_rank is None or not args.master_addr:
        raise ToolkitError(f"--nodes {args.nodes} needs --node-rank (0 to {args.nodes - 1}) and --master-addr "
                           "(node 0's address) on every node")
    if args.node_rank >= args.nodes:
        raise ToolkitError(f"--node-rank {args.node_rank} is not one of the {args.nodes} nodes (0 to {args.nodes - 1})")
    return distributed.Rendezvous(args.nodes, args.node_rank, args.master_addr, args.master_port, args.join_timeout)


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
    built, prepared.lora_modules = trainer.build_trainer(
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


def report_changes(changes: dict) -> None:
    if changes:
        listed = ", ".join(f"{key} {resume.shown(old)} -> {resume.shown(new)}" for key, (old, new) in changes.items())
        console.print(f"[yellow]note:[/] this resume changes {escape(listed)} (nothing that changes what is "
                      f"learned); recorded in {resume.START_FILE} and the run card", soft_wrap=True)


def train_and_save(prepared, run_dir: Path, resume_from: Path | None, strategy: str) -> None:
    built, result, seconds = train(prepared, run_dir, resume_from, strategy)
    summary = rundir.save_run(built, prepared, run_dir, result, seconds)
    show("Training done", ["metric", "value"],
         [[k, v] for k, v in summary.items() if not isinstance(v, (dict, list))])
    console.print(f"Adapter and run files in [bold]{escape(str(run_dir))}[/]. "
                  f"Next: toolkit eval {escape(str(run_dir))} --compare-base", soft_wrap=True)


def worker_arguments(args, run_dir: Path) -> list[str]:
    return ["sft", args.recipe, *(f"--set={o}" for o in args.overrides), "--output-dir", str(run_dir),
            "--strategy", args.strategy, *(["--resume"] if args.resume else []),
            *(["--overwrite"] if args.overwrite else [])]


def launch_workers(args, run_dir: Path) -> int:
    """Start one training process per GPU under torch.distributed.run; this process keeps the run's lock."""
    console.print(f"starting {args.gpus} training processes ({args.strategy})")
    code = distributed.launch(worker_arguments(args, run_dir), args.gpus)
    if code != 0 or not files.is_complete(run_dir, rundir.KIND):
        raise ToolkitError(f"a training process failed (exit code {code}); {run_dir} is left incomplete")
    return 0


def launch_node(args, run_dir: Path, rendezvous: distributed.Rendezvous) -> int:
    """This machine's training processes, as one node of a job; the global rank 0 (on node 0) claims the run
    directory, so nothing here touches it before every node has joined."""
    console.print(f"node {rendezvous.node_rank} of {rendezvous.nodes}: waiting up to {rendezvous.timeout} s for "
                  f"the other nodes at {rendezvous.endpoint}, then starting {args.gpus} training "
                  f"process{'es' if args.gpus > 1 else ''} "
                  f"({args.strategy})", soft_wrap=True)
    code, started, detail = distributed.launch_nodes(worker_arguments(args, run_dir), args.gpus, rendezvous)
    if not started:
        marker = files.read_marker(run_dir) or {}
        interrupted = marker.get("kind") == rundir.KIND and marker.get("complete") is False
        kept = ("is unchanged: incomplete, and resumable with --resume" if interrupted and rundir.checkpoints(run_dir)
                else "was not touched")
        raise ToolkitError(f"node {rendezvous.node_rank}: the {rendezvous.nodes} nodes did not all meet at "
                           f"{rendezvous.endpoint} within --join-timeout {rendezvous.timeout} s"
                           f"{f' ({detail})' if detail else ''}; nothing was trained and {run_dir} {kept}. Start "
                           "the same command on every node (same --master-addr and --master-port), or raise "
                           "--join-timeout")
    if code != 0:
        raise ToolkitError(f"a training process on node {rendezvous.node_rank} failed (exit code {code}); "
                           f"{run_dir} is left incomplete (continue it with --resume on every node)")
    return 0


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


def train_as_worker(args, prepared, run_dir: Path) -> int:
    """One of several training processes: under `--gpus` the launching process holds the run directory; under
    `--nodes` or a torchrun started by hand, the global rank 0 claims it for everyone."""
    if os.environ.get(distributed.HELD_ENV):
        resume_from = rundir.resumable_checkpoint(run_dir)[0] if args.resume else None
        train_and_save(prepared, run_dir, resume_from, args.strategy)
        return 0
    if not distributed.launched_by_torchrun():
        raise ToolkitError("several training processes need torch.distributed.run (torchrun) to start them: use "
                           "toolkit sft --gpus N (one machine) or --nodes N (several), or torchrun ... -m toolkit sft")
    same_run, write = start_record_steps(prepared, distributed.world_size(), args.strategy, run_dir)
    with claimed_by_rank_zero(run_dir, args.overwrite, args.resume, wait_s=max(args.join_timeout, 600),
                              check=same_run) as claim:
        if claim.finished:
            console.print(f"{escape(str(run_dir))} is a finished run; --resume only continues an interrupted one, "
                          "so nothing was trained (start a new run to train longer)", soft_wrap=True)
            return 0
        report_resume(claim)
        if distributed.is_main_process():
            write(claim)
        train_and_save(prepared, run_dir, claim.resume_from, args.strategy)
    return 0


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    distributed.mark_started()
    rendezvous = rendezvous_of(args)
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
    if distributed.world_size() > 1:
        return train_as_worker(args, prepared, run_dir)
    if args.gpus > 1 and not args.resume:  # refused here rather than in every training process (a resume: below)
        distributed.per_process_batch(prepared.recipe.train.batch_size, prepared.recipe.train.grad_accum, args.gpus)
    show_plan(prepared)
    if rendezvous is not None:
        settings = prepared.recipe.train  # the split every process will make, refused here before any node waits
        distributed.per_process_batch(settings.batch_size, settings.grad_accum, rendezvous.nodes * args.gpus)
        check_shared_steps(prepared, rendezvous.nodes * args.gpus, args.strategy)
        return launch_node(args, run_dir, rendezvous)
    if args.gpus > 1:
        check_shared_steps(prepared, args.gpus, args.strategy)
    same_run, write = start_record_steps(prepared, args.gpus, args.strategy, run_dir)
    with rundir.claimed_run_dir(run_dir, args.overwrite, args.resume, check=same_run) as claim:
        if claim.finished:
            console.print(f"{escape(str(run_dir))} is a finished run; --resume only continues an interrupted one, "
                          "so nothing was trained (start a new run to train longer)", soft_wrap=True)
            return 0
        report_resume(claim)
        write(claim)
        if args.gpus > 1:
            return launch_workers(args, run_dir)
        train_and_save(prepared, run_dir, claim.resume_from, args.strategy)
    return 0
