"""Training on several processes (GPUs) with the recipe's global batch unchanged.

`toolkit sft RECIPE --gpus N` relaunches itself under `torch.distributed.run`; the Trainer then runs data-parallel
(DDP), or sharded with `--strategy fsdp` (PyTorch FSDP) or `--strategy zero3` (DeepSpeed ZeRO-3, needs
`deepspeed`). On a machine without GPUs the same flag starts N CPU processes (gloo), which is how it is tested.
"""

from __future__ import annotations

import os
import subprocess
import sys
from importlib import resources

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


def launch(argv: list[str], processes: int) -> int:
    """Run `toolkit ARGV` in `processes` processes and wait; the exit code is the first failure's."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "toolkit", *argv]
    return subprocess.call(command)
