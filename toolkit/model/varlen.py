"""Padding-free batches through PyTorch's variable-length FlashAttention (`torch.nn.attention.varlen`).

A padding-free micro-batch is one sequence of rows laid end to end, positions restarting at each row
(`train.padding_free`). FlashAttention's variable-length kernel takes exactly that: the tokens of all rows, and
where each row starts. It computes each row's causal attention and nothing between rows, with the keys' fewer heads
as they are (grouped-query attention, no copies), on the tokens' own layout (no transposes), and needs no mask.

transformers calls an attention function registered under a name (`AttentionInterface`); for a name it has no mask
function for, it builds no mask at all. The function here therefore accepts only what it can read correctly: one
sequence (batch dimension 1), no mask, and the position ids it finds the rows by. A padded batch would need its
padding masked, so eval, generate and merge load SDPA instead (`toolkit.model.loading.attention_kernel`).
"""

from __future__ import annotations

import weakref

import torch

from toolkit.errors import ToolkitError

NAME = "varlen"


def available() -> bool:
    """PyTorch has the variable-length FlashAttention function (2.10 and later) and a GPU its FlashAttention runs
    on (compute capability 8.0 and up: A100, H100 and later)."""
    try:
        import torch.nn.attention.varlen
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)


def flash_kernel(query, key, value, starts, longest: int, scale: float | None):
    """Causal attention of each row (`starts`: int32 offsets of the rows, then the total) on (tokens, heads, dim)."""
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(query, key, value, starts, starts, longest, longest, scale=scale, window_size=(-1, 0))


def row_starts(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(where each row starts, then the token count, as int32 on the positions' device; the longest row).

    Rows start where positions are 0. The positions are read on the host once (one wait for the GPU per forward
    pass, not per layer: `cached_row_starts`)."""
    positions = position_ids.reshape(-1).cpu()
    starts = (positions == 0).nonzero().flatten()
    if starts.numel() == 0 or starts[0] != 0:
        raise ToolkitError("varlen attention: a padding-free batch's positions start at 0 for every row; these do "
                           f"not start at 0 (first: {positions[:1].tolist()})")
    bounds = torch.cat([starts, torch.tensor([positions.numel()])])
    longest = int((bounds[1:] - bounds[:-1]).max())
    return bounds.to(dtype=torch.int32, device=position_ids.device, non_blocking=True), longest


_last: list = [None, None]  # [weak reference to the position ids, their row_starts]


def cached_row_starts(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`row_starts` once per position-ids tensor: every layer of a forward pass, and backward's recomputation of
    a checkpointed layer, get the same tensor object."""
    ref, found = _last
    if ref is None or ref() is not position_ids:
        found = row_starts(position_ids)
        _last[0], _last[1] = weakref.ref(position_ids), found
    return found


def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, position_ids=None, **kwargs):
    """transformers' attention interface: query (1, heads, tokens, dim), key and value (1, kv heads, tokens, dim)
    in; (1, tokens, heads, dim) out, and no attention weights."""
    if query.shape[0] != 1 or attention_mask is not None or position_ids is None:
        raise ToolkitError("model.attn_implementation=varlen reads padding-free batches only (one sequence, "
                           "positions restarting at each row, no mask); set train.padding_free: true or use sdpa")
    if dropout:
        raise ToolkitError(f"model.attn_implementation=varlen has no attention dropout (the model asks for {dropout})")
    starts, longest = cached_row_starts(position_ids)
    out = flash_kernel(query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1), starts,
                       longest, scaling)
    return out.unsqueeze(0), None


def register() -> None:
    """Make `NAME` loadable as a model's attention implementation."""
    from transformers import AttentionInterface

    AttentionInterface.register(NAME, attention)
