"""`toolkit merge RUN_DIR --output DIR`: fold the adapter into the base weights and save a plain model.

The result loads with `from_pretrained` alone (no PEFT). Before trusting it, the saved directory is loaded back and
its logits are compared with base + adapter (unmerged, same dtype) on a few of the run's own prompts
(`toolkit.export.merging`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.markup import escape

from toolkit.commands.common import positive_number
from toolkit.config.precision import DTYPE_NAMES
from toolkit.export import merging
from toolkit.io import files
from toolkit.ui.report import console, show


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toolkit merge", description="Merge a run's adapter into its base model and save a full model."
    )
    parser.add_argument("run_dir", help="a finished run directory (from toolkit sft)")
    parser.add_argument("--output", required=True, help="directory for the merged model")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES),
                        help="dtype of the merged weights (default: the run's base dtype)")
    shares = ", ".join(f"{name} {share:g}" for name, share in merging.RELATIVE_TOLERANCE.items())
    parser.add_argument("--tolerance", type=positive_number, metavar="X",
                        help="largest allowed max |Δlogit| against base + adapter "
                             f"(default: this share of the largest |logit|, by dtype: {shares})")
    parser.add_argument("--max-shard-size", type=shard_size, default="5GB",
                        help="largest safetensors shard, e.g. 500MB (default 5GB)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output directory")
    return parser


def shard_size(text: str) -> str:
    """argparse type for --max-shard-size, checked before merging rather than when the shards are written."""
    problem = merging.shard_size_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return text


def quantized_base_note(recipe, dtype: str) -> None:
    """Say so when the merged model is not the model that was trained: the base under it was quantized then."""
    mode = recipe.quantization.mode
    if mode != "none":
        console.print(f"The adapter was trained against a quantized ({mode}) base; it is merged into the "
                      f"full-precision ({dtype}) base, since merging into a quantized base is lossy or refused "
                      "by PEFT.", soft_wrap=True)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    run_dir, out = files.expand(args.run_dir), files.expand(args.output)
    recipe, dtype = merging.start(run_dir, out, args.dtype, args.overwrite, args.tolerance, args.max_shard_size)
    quantized_base_note(recipe, dtype)
    try:
        report = merging.merge_run(run_dir, out, recipe, dtype, args.tolerance, args.max_shard_size, args.overwrite)
    except merging.CheckFailed as failed:
        show_result(out, failed.report)
        return verdict(out, failed.report, failed.traces)
    show_result(out, report)
    return verdict(out, report, [])


def show_result(out: Path, report: dict) -> None:
    show("Merged model", ["item", "value"], [
        ["directory", str(out)],
        ["dtype", report["dtype"]],
        ["prompts (tokens)", f"{report['prompts']} ({report['tokens']} tokens, {report['image_prompts']} with an image)"],
        ["max |Δlogit| merged vs base+adapter", f"{report['max_abs_delta']:.3g}"],
        ["tolerance", f"{report['tolerance']:.3g}"],
        ["max |Δlogit| base vs base+adapter", f"{report['adapter_effect']:.3g}"],
        ["max |logit|", f"{report['max_abs_logit']:.3g}"],
    ])


def verdict(out: Path, report: dict, traces: list[str]) -> int:
    """0 when the saved model reproduces base + adapter; 1 (and nothing written to `out`) when it does not."""
    problem = merging.failure(out, report, traces)
    if problem:
        console.print(f"[bold red]error:[/] {escape(problem)}", soft_wrap=True)
        return 1
    if report["adapter_effect"] <= report["tolerance"]:
        console.print(f"[yellow]note:[/] the adapter moves logits by at most {report['adapter_effect']:.3g}, within "
                      "the tolerance, so this check cannot tell the merged model from the base; --dtype fp32 can",
                      soft_wrap=True)
    console.print(f"Merged model in [bold]{escape(str(out))}[/]: loads with from_pretrained, no PEFT needed.",
                  soft_wrap=True)
    return 0
