"""`toolkit sft RECIPE`: LoRA fine-tuning through TRL's SFTTrainer, into a self-describing run directory."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.markup import escape

from toolkit.commands.common import add_recipe_arguments, non_negative_int, positive_int
from toolkit.config.recipe import load_recipe
from toolkit.errors import ToolkitError
from toolkit.io import files
from toolkit.model import fastlora
from toolkit.runs import rundir
from toolkit.training import activations, distributed, fit, memory
from toolkit.training.prepare import prepare, show_plan
from toolkit.ui.report import console


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


def train_as_worker(args, prepared, run_dir: Path) -> int:
    """One of several training processes: under `--gpus` the launching process holds the run directory; under
    `--nodes` or a torchrun started by hand, the global rank 0 claims it for everyone."""
    if os.environ.get(distributed.HELD_ENV):
        resume_from = rundir.resumable_checkpoint(run_dir)[0] if args.resume else None
        fit.train_and_save(prepared, run_dir, resume_from, args.strategy)
        return 0
    if not distributed.launched_by_torchrun():
        raise ToolkitError("several training processes need torch.distributed.run (torchrun) to start them: use "
                           "toolkit sft --gpus N (one machine) or --nodes N (several), or torchrun ... -m toolkit sft")
    same_run, write = fit.start_record_steps(prepared, distributed.world_size(), args.strategy, run_dir)
    with fit.claimed_by_rank_zero(run_dir, args.overwrite, args.resume, wait_s=max(args.join_timeout, 600),
                              check=same_run) as claim:
        if claim.finished:
            console.print(f"{escape(str(run_dir))} is a finished run; --resume only continues an interrupted one, "
                          "so nothing was trained (start a new run to train longer)", soft_wrap=True)
            return 0
        fit.report_resume(claim)
        if distributed.is_main_process():
            write(claim)
        fit.train_and_save(prepared, run_dir, claim.resume_from, args.strategy)
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
    if problem := fastlora.fp8_problem(recipe, args.strategy):
        raise ToolkitError(problem)
    auto = {key: getattr(recipe.train, key) == "auto" for key in ("batch_size", "checkpoint_layers")}
    prepared, plan = memory.memory_plan(prepared)  # the auto settings become numbers here
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
        fit.check_shared_steps(prepared, rendezvous.nodes * args.gpus, args.strategy)
        memory.check_host_memory(prepared, args.gpus)  # this node's processes; they skip `fit.train_into`
        return launch_node(args, run_dir, rendezvous)
    if args.gpus > 1:
        fit.check_shared_steps(prepared, args.gpus, args.strategy)
    launch = (lambda: launch_workers(args, run_dir)) if args.gpus > 1 else None
    code = fit.train_into(prepared, run_dir, overwrite=args.overwrite, resume=args.resume, processes=args.gpus,
                          strategy=args.strategy, launch=launch)
    return 0 if code is None else code
