"""Precision policy, in one place: what `train.precision: auto` becomes on a device, the dtype the frozen base loads
in, and what a precision asks of batch shapes.

Tensor cores run bf16/fp16 matmuls fastest on dimensions that are multiples of 8, so under those precisions every
micro-batch is padded to a multiple of 8 tokens: training's collators, the memory plan and the benchmark all ask
`pad_multiple` rather than restating the rule.
"""

from __future__ import annotations

from dataclasses import dataclass

from toolkit.errors import ToolkitError

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class Accelerator:
    """What the training device can do; the only input precision choices depend on."""

    cuda: bool
    bf16: bool
    name: str = "cpu"


def resolve_precision(requested: str, device: Accelerator) -> str:
    """auto: bf16 where the GPU supports it, else fp16 on a GPU, fp32 on CPU. Refuses what the device cannot do."""
    if requested == "auto":
        if not device.cuda:
            return "fp32"
        return "bf16" if device.bf16 else "fp16"
    if requested == "fp16" and not device.cuda:
        raise ToolkitError("train.precision=fp16 needs a CUDA GPU and none is visible; use auto, fp32 or bf16 on CPU")
    if requested == "bf16" and device.cuda and not device.bf16:
        raise ToolkitError(f"train.precision=bf16 is not supported by {device.name}; use auto or fp16")
    return requested


def base_dtype(model_dtype: str, precision: str) -> str:
    """The torch dtype name the frozen base weights load in."""
    return DTYPE_NAMES[precision if model_dtype == "auto" else model_dtype]


def pad_multiple(precision: str) -> int:
    """Tokens a micro-batch's length is rounded up to a multiple of (1: no rounding)."""
    return 8 if precision in ("bf16", "fp16") else 1
