"""GPU check of `toolkit.model.fp8`: the Triton row quantizer against the PyTorch reference, the FP8 products' error
against bf16, and their speed at the shapes of the 11B model's layers.

    python3 scripts/gpu_fp8_check.py [--tokens 21504]

Needs a CUDA GPU of compute capability 8.9+ with Triton (PyTorch's CUDA wheels bring it). Prints four short tables;
`--held-only` prints the last only: what holding one decoder layer's weights in FP8 costs once and saves per step.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from toolkit.model import fp8

SHAPES = ((4096, 4096), (4096, 1024), (4096, 14336), (14336, 4096))  # (in, out): q/o, k/v, gate/up, down


def timed(fn, *args, repeats: int = 20, **kwargs) -> float:
    """Median milliseconds of `fn(*args, **kwargs)` on the GPU."""
    for _ in range(3):
        fn(*args, **kwargs)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args, **kwargs)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def check_quantizer(tokens: int) -> None:
    print(f"{'rows x cols':>14} {'bytes equal':>12} {'scale rel diff':>15} {'dequant rel err':>16}")
    for rows, cols in ((tokens, 4096), (tokens, 14336), (14336, 4096), (1, 4096), (37, 1024)):
        x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16) * torch.rand(rows, 1, device="cuda") * 10
        q, scale = fp8.quantize_rows(x)
        ref_q, ref_scale = fp8.reference_rows(x)
        equal = (q.view(torch.uint8) == ref_q.view(torch.uint8)).float().mean().item()
        scale_diff = ((scale - ref_scale).abs() / ref_scale).max().item()
        err = relative(q.float() * scale, x)
        print(f"{rows:>7}x{cols:<6} {equal:>12.6f} {scale_diff:>15.2e} {err:>16.2e}")


def check_products(tokens: int) -> None:
    print(f"\n{'in->out':>12} {'bf16 ms':>8} {'fp8 ms':>7} {'fp8 shared-x ms':>16} {'quant x ms':>10} "
          f"{'rel err':>8} | {'dgrad bf16':>10} {'dgrad fp8':>9} {'rel err':>8}")
    for d_in, d_out in SHAPES:
        x = torch.randn(tokens, d_in, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(d_out, d_in, device="cuda", dtype=torch.bfloat16) / d_in ** 0.5
        g = torch.randn(tokens, d_out, device="cuda", dtype=torch.bfloat16)
        rows = fp8.quantize_rows(x)
        bf16 = timed(F.linear, x, w)
        full = timed(fp8.linear, x, w)
        shared = timed(fp8.linear, x, w, rows=rows)
        quant = timed(fp8.quantize_rows, x)
        err = relative(fp8.linear(x, w), F.linear(x, w))
        dgrad_bf16 = timed(torch.matmul, g, w)
        dgrad_fp8 = timed(fp8.input_grad, g, w)
        dgrad_err = relative(fp8.input_grad(g, w), g @ w)
        print(f"{d_in:>5}->{d_out:<6} {bf16:>8.3f} {full:>7.3f} {shared:>16.3f} {quant:>10.3f} {err:>8.2e} | "
              f"{dgrad_bf16:>10.3f} {dgrad_fp8:>9.3f} {dgrad_err:>8.2e}")


LAYER = ((4096, 4096), (4096, 1024), (4096, 1024), (4096, 4096), (4096, 14336), (4096, 14336), (14336, 4096))


def check_held(tokens: int) -> None:
    """One self-attention layer's seven frozen weights (q, k, v, o, gate, up, down): the quantization a step repeats
    per pass without holding (rows for the forward and the recomputation, transposed columns for backward), the
    one-time cost of holding them (both e4m3 forms, the bf16 matrix to host memory and back), and that the held
    forms give the bytes of the per-pass products."""
    import time

    from toolkit.model import fastlora

    layers = [torch.nn.Linear(i, o, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
              for i, o in LAYER]
    weights = [layer.weight for layer in layers]
    rows_ms = sum(timed(fp8.quantize_rows, w) for w in weights)
    columns_ms = sum(timed(lambda w: fp8.quantize_rows(w.t().contiguous()), w) for w in weights)
    x = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16)
    g = torch.randn(tokens, 4096, device="cuda", dtype=torch.bfloat16)
    per_pass = fp8.linear(x, weights[0]), fp8.input_grad(g, weights[3])
    torch.cuda.synchronize()
    start = time.perf_counter()
    held = []
    for layer in layers:
        fastlora.hold_in_fp8(layer, held)
    torch.cuda.synchronize()
    hold_s = time.perf_counter() - start
    resident = fastlora.resident(layers[0]), fastlora.resident(layers[3])
    same = (torch.equal(fp8.linear(x, resident[0]), per_pass[0]) and
            torch.equal(fp8.input_grad(g, resident[1]), per_pass[1]))
    start = time.perf_counter()
    fastlora.give_back(held)
    torch.cuda.synchronize()
    back_s = time.perf_counter() - start
    params = sum(w.numel() for w in weights)
    print(f"\none decoder layer's 7 weights ({params / 1e6:.0f} M), held in FP8:")
    print(f"{'per-pass rows ms':>17} {'per-pass columns ms':>20} {'saved per step, 32 layers, ms':>30} "
          f"{'hold s':>7} {'give back s':>11} {'same bytes':>10}")
    saved = 32 * (2 * rows_ms + columns_ms)  # forward + recomputation (all layers checkpointed) + backward
    print(f"{rows_ms:>17.3f} {columns_ms:>20.3f} {saved:>30.1f} {hold_s:>7.3f} {back_s:>11.3f} {same!s:>10}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=21504)  # batch 96 of rows averaging 224 tokens
    parser.add_argument("--held-only", action="store_true")
    args = parser.parse_args()
    assert fp8.available(), "needs a GPU of compute capability 8.9+"
    assert fp8.triton_rows_kernel() is not None, "needs Triton"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.tokens} tokens\n")
    if not args.held_only:
        check_quantizer(args.tokens)
        check_products(args.tokens)
    check_held(args.tokens)


if __name__ == "__main__":
    main()
