"""`toolkit bench RECIPE`: real training steps of a recipe's setup, measured so that repeated runs agree.

Reports real (non-pad) tokens/s with its spread over steps (min / median / max), padded tokens/s, MFU and peak GPU
memory for the recipe and any `--compare` setups, on the same rows, so results read as ratios. Training goes
through the same translators and trainer as `toolkit sft`; only the data is synthetic (token ids with a chosen
length distribution), because speed does not depend on which tokens they are.

What keeps the numbers still (docs/benchmarks.md shows the effect):
- every setup runs in its own process (`--isolation process`), so nothing one setup leaves behind (Liger's patches
  of transformers' classes, allocator state, compiled kernels) reaches the next, and the order of setups does not
  matter;
- the batches are fixed by the bench, not drawn by the Trainer: the same rows in the same batches for every setup
  with the same batch size;
- the warm-up steps replay measured batches that cover every shape class the measured steps meet (the longest
  batch, for the allocator's high-water mark, the shortest, and padded lengths of each residue mod 16, which is
  what Triton specializes its kernels on), so no compilation or autotuning falls into a measured step;
- step times come from CUDA events recorded at each step's end, so measuring adds no device synchronization;
- 30 measured steps by default: one step's tokens vary with its rows' lengths, a sum over many does not.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from toolkit.bench import harness
from toolkit.ui.report import console, show, write_json


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolkit bench", description="Measure training speed and memory.")
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--random-weights", action="store_true",
                        help="use the full-size Llama-3.2-11B-Vision architecture with random weights (no download)")
    parser.add_argument("--steps", type=int, default=30, help="measured optimizer steps (default 30)")
    parser.add_argument("--warmup", type=int, default=5,
                        help="steps replayed first and not measured; they cover the measured steps' shapes")
    parser.add_argument("--lengths", default="70:370", help="row lengths in tokens, MIN:MAX uniform")
    parser.add_argument("--compare", action="append", default=[], metavar="SETUP",
                        help="also measure 'original' or 'LABEL: key=value ...' (repeatable; a LABEL ending in "
                             "@before turns the fast paths off); measured first, in order")
    parser.add_argument("--profile", action="store_true", help="profile 2 extra steps of every setup")
    parser.add_argument("--losses", action="store_true", help="log and keep every step's loss")
    parser.add_argument("--isolation", choices=("process", "none"), default="process",
                        help="run each setup in its own process (default) or all in this one")
    parser.add_argument("--json", help="write results here (default: bench.json in the current directory)")
    parser.add_argument("--setup-timeout", type=float, default=None, metavar="SECONDS",
                        help="stop a setup's process after this long and report it as failed (--isolation process)")
    parser.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                        help="the whole run's wall-clock budget: a setup still running then is stopped (--isolation "
                             "process), and setups not started are reported as skipped")
    parser.add_argument("--no-recipe", action="store_true",
                        help="measure only the --compare setups, not the recipe as it is")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    bench = harness.plan_bench(args.recipe, args.overrides, args.compare, no_recipe=args.no_recipe,
                               random_weights=args.random_weights, steps=args.steps, warmup=args.warmup,
                               lengths=args.lengths, profile=args.profile, losses=args.losses,
                               isolation=args.isolation, setup_timeout=args.setup_timeout, time_limit=args.time_limit)
    results = []
    for setup in bench.setups:
        console.print(f"[bold]{setup.label}[/]: {' '.join(setup.overrides) or 'as the recipe says'}")
        results.append(harness.run_setup(bench, setup))
        show_results(results)
        write_json(Path(args.json or "bench.json"), bench.document(results))
    for r in results:
        if r.get("profile"):
            show_profile(r["setup"], r["profile"])
    return 0 if all("error" not in r for r in results) else 1


def show_results(results: list[dict]) -> None:
    done = [r for r in results if "error" not in r]
    for r in results:
        if "error" in r:
            console.print(f"[red]{r['setup']} failed[/]: {r['error']}")
    if not done:
        return
    base = done[0]["real_tok_s"]
    rows = [
        [r["setup"], r["quantization"], f"{r['batch']}x{r['grad_accum']}", checkpointing_label(r),
         round(r["real_tok_s"]),
         f"{r['real_tok_s_min']:,.0f} / {r['real_tok_s_median']:,.0f} / {r['real_tok_s_max']:,.0f}",
         f"{r['pad_efficiency']:.0%}", f"{r['median_step_s']:.3f}", f"{r['mfu']:.1%}" if r["mfu"] else "n/a",
         f"{r['peak_gib']:.1f}" if r["peak_gib"] else "n/a", f"{r['predicted_peak_gib']:.1f}",
         f"{r['images_s']:.1f}" if r.get("images_s") else "-", f"{r['real_tok_s'] / base:.2f}x"]
        for r in done
    ]
    show("Training speed (measured steps after warm-up)",
         ["setup", "quant", "batch", "ckpt", "real tok/s", "per step min / med / max", "real/padded", "step s",
          "MFU", "peak GiB", "est. GiB", "images/s", "vs first"], rows)


def checkpointing_label(result: dict) -> str:
    """no, yes or offload, and how many layers when not all: `yes 24/32`."""
    mode = result["checkpointing"]
    label = "offload" if mode == "offload" else "yes" if mode else "no"
    if mode and result.get("checkpointed_layers") is not None and \
            result["checkpointed_layers"] != result.get("text_layers"):
        label += f" {result['checkpointed_layers']}/{result['text_layers']}"
    return label


def show_profile(label: str, profile: dict) -> None:
    """One table per profiled setup: ms per step, where the GPU works and where it waits."""
    rows = [["wall", profile["wall_ms"]], ["GPU busy", profile["gpu_busy_ms"]]]
    rows += [[f"GPU idle: {k}", v] for k, v in profile["gpu_idle_ms"].items()]
    rows += [[f"kernels: {k}", v] for k, v in profile["kernel_ms"].items()]
    rows += [[f"CPU waits in {k} ({v['calls']:g} calls)", v["ms"]] for k, v in profile["syncs_per_step"].items()]
    show(f"Profile of {label} (ms per optimizer step, {profile['steps']} steps)", ["where", "ms"],
         [[k, round(v, 2)] for k, v in rows])
