"""`model.attn_implementation: varlen`'s kernel on a GPU: its output and gradients against per-row causal SDPA in fp32
(96 rows of 70-370 tokens, 32 query and 8 key/value heads, as in Llama 3.2 11B), and its time per layer.

    PYTHONPATH=/tmp/site:$PWD python3 scripts/gpu_varlen_check.py

Needs a CUDA GPU and PyTorch 2.10 or later. Relative errors of a few 1e-3 are bf16's rounding; a kernel that let
rows see each other, or that mishandled the grouped heads, is off by far more.
"""

from __future__ import annotations

import time

import torch

from toolkit.model import varlen


def main() -> None:
    torch.manual_seed(0)
    lengths = torch.randint(70, 371, (96,)).tolist()
    tokens = sum(lengths)
    starts = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    scale = 128 ** -0.5
    q = torch.randn(tokens, 32, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(tokens, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(tokens, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    g = torch.randn(tokens, 32, 128, device="cuda", dtype=torch.bfloat16)
    out = varlen.flash_kernel(q, k, v, starts, max(lengths), scale)
    out.backward(g)
    found = [out.float()] + [t.grad.float() for t in (q, k, v)]
    qf, kf, vf = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    reference = torch.empty(tokens, 32, 128, device="cuda")
    for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
        rows = [t[a:b].transpose(0, 1) for t in (qf, kf, vf)]
        rows[1], rows[2] = rows[1].repeat_interleave(4, 0), rows[2].repeat_interleave(4, 0)
        reference[a:b] = torch.nn.functional.scaled_dot_product_attention(*rows, is_causal=True,
                                                                          scale=scale).transpose(0, 1)
    reference.backward(g.float())
    for name, x, r in zip(("out", "dq", "dk", "dv"), found, (reference, qf.grad, kf.grad, vf.grad)):
        print(f"varlen vs fp32 per-row SDPA: {name} relative error {((x - r).norm() / r.norm()).item():.2e}")

    def step():
        varlen.flash_kernel(q, k, v, starts, max(lengths), scale).backward(g)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        step()
    torch.cuda.synchronize()
    print(f"varlen fwd+bwd, {tokens} tokens in 96 rows: {(time.perf_counter() - start) / 10 * 1000:.2f} ms per layer")


if __name__ == "__main__":
    main()
