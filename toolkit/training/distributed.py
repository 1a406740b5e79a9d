"""Training on several processes (GPUs) with the recipe's global batch unchanged.

`toolkit sft RECIPE --gpus N` relaunches itself under `torch.distributed.run`; the Trainer then runs data-parallel
(DDP), or sharded with `--strategy fsdp` (PyTorch FSDP) or `--strategy zero3` (DeepSpeed ZeRO-3, needs
`deepspeed`). On a machine without GPUs the same flag starts N CPU processes (gloo), which is how it is tested.

Several machines: `--nodes N --node-rank R --master-addr HOST` on every node starts `torch.distributed.run` with a
static rendezvous whose wait is bounded (`--join-timeout`), so a node whose peers never come ends in one line
instead of torchrun's traceback after ten minutes. `torch.distributed.run ... -m toolkit sft` started by hand works
too; either way the global rank 0 claims the run directory and tells the other processes what it decided through
torchrun's own key-value store (`claim_outcome`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from datetime import timedelta
from importlib import resources
from pathlib import Path

from toolkit.errors import ToolkitError

STRATEGIES = ("ddp", "fsdp", "zero3")
# Decoder blocks FSDP wraps one by one (Mllama's three kinds and plain Llama's).
FSDP_WRAP = [
    "MllamaSelfAttentionDecoderLayer",
    "MllamaCrossAttentionDecoderLayer",
    "MllamaVisionEncoderLayer",
    "LlamaDecoderLayer",
]


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def gather_objects(value) -> list:
    """`value` from every process, in rank order (one process: `[value]`); every process must call it."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [value]
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def per_process_batch(batch_size: int, grad_accum: int, processes: int) -> tuple[int, int]:
    """Split the recipe's global batch (batch_size x grad_accum) over processes: fewer accumulation steps first,
    then smaller micro-batches; refuse a split that would change the global batch."""
    if processes == 1:
        return batch_size, grad_accum
    if grad_accum % processes == 0:
        return batch_size, grad_accum // processes
    if batch_size % processes == 0:
        return batch_size // processes, grad_accum
    raise ToolkitError(
        f"the global batch train.batch_size x train.grad_accum = {batch_size} x {grad_accum} cannot be split "
        f"evenly over {processes} processes; make one of them divisible by {processes}"
    )


def strategy_kwargs(strategy: str, gradient_checkpointing: bool) -> dict:
    """SFTConfig arguments for the sharding strategy (DDP needs none)."""
    if strategy == "fsdp":
        return {
            "fsdp": "full_shard auto_wrap",
            "fsdp_config": {
                "transformer_layer_cls_to_wrap": FSDP_WRAP,
                "use_orig_params": True,  # LoRA: frozen and trainable weights share flat parameters
                "activation_checkpointing": gradient_checkpointing,  # FSDP's own, instead of the Trainer's
            },
            "gradient_checkpointing": False,
        }
    if strategy == "zero3":
        return {"deepspeed": str(resources.files("toolkit").joinpath("assets/deepspeed_zero3.json"))}
    return {}


# Set by `launch` for the processes it starts: the launching process already holds the run directory.
HELD_ENV = "TOOLKIT_RUN_HELD"
# Set by `launch_nodes`: a file each training process touches first, so the launcher knows the rendezvous completed.
STARTED_ENV = "TOOLKIT_STARTED_FILE"
DEFAULT_JOIN_TIMEOUT = 300  # seconds a node waits for the others; the nodes of one scheduler job start within this


def launch(argv: list[str], processes: int) -> int:
    """Run `toolkit ARGV` in `processes` processes and wait; the exit code is the first failure's."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "toolkit", *argv]
    return subprocess.call(command, env={**os.environ, HELD_ENV: "1"})


@dataclass(frozen=True)
class Rendezvous:
    """Where the nodes of one training job meet: node 0's address and port, and how long each node waits there."""

    nodes: int
    node_rank: int
    host: str
    port: int
    timeout: int  # seconds

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.port}"

    def torchrun_arguments(self) -> list[str]:
        # The static rendezvous (torchrun's default with --master-addr) reads `timeout` both as node 0's wait for
        # the others and as the others' wait to reach node 0.
        return [f"--nnodes={self.nodes}", f"--node-rank={self.node_rank}", f"--master-addr={self.host}",
                f"--master-port={self.port}", f"--rdzv-conf=timeout={self.timeout}"]


def launch_nodes(argv: list[str], processes: int, rendezvous: Rendezvous) -> tuple[int, bool, str]:
    """Run `toolkit ARGV` in `processes` processes on this node, as one node of `rendezvous`, and wait.

    Returns the exit code, whether the training processes started (the rendezvous completed), and torchrun's last
    error line when they did not. Until a training process starts, what torchrun writes to stderr is held back:
    a failed rendezvous is torchrun's traceback and C++ socket logs, which the caller turns into one line.
    """
    with tempfile.TemporaryDirectory(prefix="toolkit-launch-") as folder:
        started = Path(folder) / "started"
        command = [sys.executable, "-m", "torch.distributed.run", *rendezvous.torchrun_arguments(),
                   f"--nproc-per-node={processes}", "-m", "toolkit", *argv]
        process = subprocess.Popen(command, env={**os.environ, STARTED_ENV: str(started)}, stderr=subprocess.PIPE)
        held: list[bytes] = []
        forward = threading.Thread(target=pass_on_once_started, args=(process.stderr, started, held), daemon=True)
        forward.start()
        code = process.wait()
        forward.join()
        ran = started.exists()
    return code, ran, last_error_line(b"".join(held).decode("utf-8", "replace"))


def pass_on_once_started(stream, started: Path, held: list[bytes]) -> None:
    """Copy `stream` to stderr once `started` exists; keep what came before in `held` (shown when it did start)."""
    out = sys.stderr.buffer if hasattr(sys.stderr, "buffer") else None
    for chunk in iter(lambda: stream.read1(65536), b""):
        if out is None or not started.exists():
            held.append(chunk)
            continue
        if held:
            out.write(b"".join(held))
            held.clear()
        out.write(chunk)
        out.flush()
    if out is not None and started.exists() and held:
        out.write(b"".join(held))
        out.flush()
        held.clear()


def last_error_line(text: str) -> str:
    """The message of the last Python exception in torchrun's output ("Timed out after 4 seconds waiting for
    clients. 1/2 clients joined."), or its last line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line.split(": ", 1)[1] for line in lines
              if ": " in line and line.split(": ", 1)[0].rsplit(".", 1)[-1].endswith(("Error", "Exception"))]
    return (errors or lines or [""])[-1][:200]


def mark_started() -> None:
    """Tell `launch_nodes` that this training process runs (the rendezvous completed)."""
    path = os.environ.get(STARTED_ENV)
    if path:
        Path(path).touch()


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ


def claim_key() -> str:
    run = os.environ.get("TORCHELASTIC_RUN_ID", "")
    restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return f"toolkit/{run}/{restart}/run-directory"


def job_store(timeout_s: float):
    """A client of the key-value store torchrun's agent keeps for the job (at MASTER_ADDR:MASTER_PORT)."""
    from torch.distributed import TCPStore

    return TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                    timeout=timedelta(seconds=timeout_s))


def share_claim_outcome(outcome: dict) -> None:
    """Rank 0: publish what it decided about the run directory (or why it refused)."""
    job_store(60).set(claim_key(), json.dumps(outcome))


def claim_outcome(timeout_s: float) -> dict:
    """Other ranks: wait for rank 0's decision about the run directory."""
    store = job_store(timeout_s)
    store.wait([claim_key()])
    return json.loads(store.get(claim_key()).decode("utf-8"))
