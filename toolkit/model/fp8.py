"""Matmuls against frozen weights in FP8 (e4m3), for `train.fp8_matmuls`.

Why: on a GPU of compute capability 8.9 or later (H100, H200, L40S, ...) an FP8 matmul has twice the peak rate of a
bf16 one, and with LoRA most of a training step is matmuls against frozen weights: the forward pass, its
recomputation under gradient checkpointing and the input gradient of backward. Only those run here; the adapters, the
attention, norms and the weight gradients of the adapters stay in the compute dtype.

How: each row of the activation and each output row of the weight is scaled so that its largest magnitude becomes
e4m3's largest (448), rounded to e4m3, and `torch._scaled_mm` multiplies the e4m3 matrices and undoes both scales in
its epilogue, writing bf16. One scale per row (rather than one per tensor) keeps a row with an outlier from flattening
every other row to zero. The input gradient `g @ W` is scaled by rows of `g` and by columns of `W` (the dimension the
product keeps). On a GPU, one Triton kernel per call reads each row, finds its largest magnitude and writes the e4m3
row and its scale (read twice, written once, in place of about five passes with PyTorch operators); elsewhere the same
arithmetic runs as PyTorch operators, which is what the CPU tests check.

A frozen weight is the same in every step, so with `all` a plain (bf16) weight is quantized once, when training
starts (`ResidentWeight`): both its e4m3 forms stay on the GPU in place of the bf16 matrix, which waits in host
memory until training ends. Quantizing each weight again in every pass (forward, recomputation and backward, the
last through a transposed bf16 copy) took 0.48 ms per decoder layer for the rows and 2.03 ms for the transposed
columns on an H100 (`scripts/gpu_fp8_check.py --held-only`): about 96 ms per step of the 11B model's 32 layers.
"""

from __future__ import annotations

import functools
import weakref

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # largest finite e4m3fn value
TINY = 1e-12  # an all-zero row gets this as its largest magnitude, so its scale is not zero


def available() -> bool:
    """Whether this machine's GPU multiplies FP8 matrices: compute capability 8.9 or later (Ada, Hopper and newer)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9) and \
        hasattr(torch, "_scaled_mm")


def fits(in_features: int, out_features: int) -> bool:
    """`torch._scaled_mm` needs both weight dimensions to be multiples of 16."""
    return in_features % 16 == 0 and out_features % 16 == 0


# ---- rows to e4m3 ----


def reference_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 rows, fp32 scale per row, shape (rows, 1)) with x ~= e4m3 * scale, by PyTorch operators."""
    largest = x.abs().amax(dim=1, keepdim=True).float().clamp_min(TINY)
    scale = largest / E4M3_MAX
    scaled = x.float() * scale.reciprocal()
    return scaled.clamp_(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


@functools.cache
def triton_rows_kernel():
    """The Triton kernel that does `reference_rows` in one program per row; None where Triton is missing."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def rows(x_ptr, q_ptr, scale_ptr, n_cols, x_stride, q_stride, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        x_row = x_ptr + row * x_stride
        q_row = q_ptr + row * q_stride
        largest = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            values = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
            largest = tl.maximum(largest, tl.abs(values))
        scale = tl.maximum(tl.max(largest, axis=0), 1e-12) / 448.0
        inverse = 1.0 / scale
        for start in range(0, n_cols, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            values = tl.load(x_row + cols, mask=cols < n_cols, other=0.0).to(tl.float32) * inverse
            values = tl.minimum(tl.maximum(values, -448.0), 448.0)
            tl.store(q_row + cols, values.to(q_ptr.dtype.element_ty), mask=cols < n_cols)
        tl.store(scale_ptr + row, scale)

    return rows


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`reference_rows(x)` for a 2-D `x`: by the Triton kernel on a GPU where Triton is installed, else by PyTorch
    operators."""
    kernel = triton_rows_kernel() if x.is_cuda else None
    if kernel is None or x.shape[0] == 0 or x.stride(1) != 1:
        return reference_rows(x)
    q = torch.empty(x.shape, dtype=E4M3, device=x.device)
    scale = torch.empty((x.shape[0], 1), dtype=torch.float32, device=x.device)
    kernel[(x.shape[0],)](x, q, scale, x.shape[1], x.stride(0), q.stride(0), BLOCK=1024, num_warps=4)
    return q, scale


class LastInput:
    """The e4m3 rows of the last activation quantized, kept while that activation lives unchanged.

    q, k and v read the same normalized hidden states, as do the MLP's gate and up projections; each is a separate
    module, so without this the same rows would be quantized three times (and twice). One slot: the next different
    input replaces it. A tensor made under `torch.inference_mode` (generation during training) has no version
    counter to tell an in-place change by, so its rows are quantized every time and not kept."""

    def __init__(self):
        self.source = None
        self.version = -1
        self.rows = None

    def get(self, source: torch.Tensor, flat: torch.Tensor):
        if source.is_inference():
            return quantize_rows(flat)
        if self.source is not None and self.source() is source and self.version == source._version:
            return self.rows
        self.rows = quantize_rows(flat)
        self.source, self.version = weakref.ref(source), source._version
        return self.rows

    def clear(self) -> None:
        self.source, self.rows = None, None


LAST_INPUT = LastInput()


# ---- frozen weights quantized once ----


class ResidentWeight:
    """Both e4m3 forms of a frozen weight (out x in): its rows with one scale per output row, for the forward
    product, and the rows of its transpose with one scale per input column, for the input gradient; exactly what
    `linear` and `input_grad` would make from the weight on every call."""

    def __init__(self, weight: torch.Tensor):
        self.rows, self.scale = quantize_rows(weight)
        self.columns, self.column_scale = quantize_rows(weight.t().contiguous())
        self.shape = tuple(weight.shape)


def weight_rows(weight) -> tuple[torch.Tensor, torch.Tensor]:
    return (weight.rows, weight.scale) if isinstance(weight, ResidentWeight) else quantize_rows(weight)


def weight_columns(weight) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(weight, ResidentWeight):
        return weight.columns, weight.column_scale
    return quantize_rows(weight.t().contiguous())


# ---- the two products ----


def scaled_product(a, scale_a, b_rows, scale_b, dtype: torch.dtype) -> torch.Tensor:
    """a @ b_rows^T with a (m x k) and b_rows (n x k) e4m3, each row scaled, written in `dtype`."""
    return torch._scaled_mm(a, b_rows.t(), scale_a=scale_a, scale_b=scale_b.t(), out_dtype=dtype)


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None,
           rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for a 2-D `x`, through e4m3 (`weight`: a matrix or a `ResidentWeight`; `rows`:
    x's e4m3 rows and scales if already made)."""
    if x.shape[0] == 0:
        return x.new_zeros((0, weight.shape[0])) if bias is None else bias.expand(0, -1).clone()
    x_rows, x_scale = rows if rows is not None else quantize_rows(x)
    w_rows, w_scale = weight_rows(weight)
    out = scaled_product(x_rows, x_scale, w_rows, w_scale, x.dtype)
    return out if bias is None else out.add_(bias)


def input_grad(grad: torch.Tensor, weight) -> torch.Tensor:
    """`grad @ weight` (the input gradient of `x @ weight^T`) for a 2-D `grad`, through e4m3: `grad` scaled by rows,
    `weight` (a matrix or a `ResidentWeight`) by columns (the rows of its transpose)."""
    if grad.shape[0] == 0:
        return grad.new_zeros((0, weight.shape[1]))
    g_rows, g_scale = quantize_rows(grad)
    w_rows, w_scale = weight_columns(weight)
    return scaled_product(g_rows, g_scale, w_rows, w_scale, grad.dtype)
