"""The fused LoRA function alone on a GPU: ms per forward and per forward + backward at the size of one attention
projection of a b96 step, and its output and gradients against plain autograd through F.dropout with the same mask.

    PYTHONPATH=/tmp/site:$PWD python3 scripts/gpu_fused_lora_micro.py [--old path/to/an/older/fastlora.py]

`--old` times another version of toolkit/model/fastlora.py (e.g. `git show REV:toolkit/model/fastlora.py > old.py`)
in the same process. Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import time

import torch
import torch.nn.functional as F

from toolkit.model import fastlora

N, D, O, R, P, S = 21000, 4096, 4096, 8, 0.05, 4.0


def timed(fn, repeats: int = 20) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--old", help="another fastlora.py to time alongside")
    args = parser.parse_args()
    versions = [("new", fastlora)]
    if args.old:
        spec = importlib.util.spec_from_file_location("fastlora_old", args.old)
        old = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(old)
        versions.insert(0, ("old", old))
    dev, dt = "cuda", torch.bfloat16
    layer = torch.nn.Linear(D, O, bias=False, device=dev, dtype=dt).requires_grad_(False)
    x = torch.randn(N, D, device=dev, dtype=dt, requires_grad=True)
    a = (torch.randn(R, D, device=dev, dtype=dt) * 0.02).requires_grad_(True)
    b = (torch.randn(O, R, device=dev, dtype=dt) * 0.02).requires_grad_(True)
    g = torch.randn(N, O, device=dev, dtype=dt)

    def fused(module, p):
        extra = ("none",) if "fp8_mode" in inspect.signature(module.LoraLinearFunction.forward).parameters else ()
        return module.LoraLinearFunction.apply(x, a, b, layer, "dense", S, p, *extra)

    print(f"{'code':4} {'p':>5} {'fwd ms':>7} {'fwd+bwd ms':>10} {'base matmul ms':>14}   (N={N}, {D}->{O}, r={R})")
    for p in (0.0, P):
        for name, module in versions:
            forward = timed(lambda module=module, p=p: fused(module, p))
            both = timed(lambda module=module, p=p: fused(module, p).backward(g))
            base = timed(lambda: layer(x.detach()))
            print(f"{name:4} {p:>5} {forward:>7.2f} {both:>10.2f} {base:>14.2f}")

    def grads(fn):
        for t in (x, a, b):
            t.grad = None
        torch.manual_seed(7)
        out = fn()
        out.backward(g)
        return [out.detach().float()] + [t.grad.float().clone() for t in (x, a, b)]

    reference = grads(lambda: layer(x) + S * (F.dropout(x, P, True) @ a.t()) @ b.t())
    for name, module in versions:
        errors = [((f - r).norm() / r.norm()).item() for f, r in zip(grads(lambda module=module: fused(module, P)), reference)]
        print(f"{name}: relative error vs autograd with F.dropout's mask: out {errors[0]:.2e} dx {errors[1]:.2e} "
              f"dA {errors[2]:.2e} dB {errors[3]:.2e}")


if __name__ == "__main__":
    main()
