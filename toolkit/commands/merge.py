"""`toolkit merge RUN_DIR --output DIR`: fold the adapter into the base weights and save a plain model.

The result loads with `from_pretrained` alone (no PEFT). Before trusting it, the saved directory is loaded back and
its logits are compared with base + adapter (unmerged, same dtype) on a few of the run's own prompts.
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

from rich.markup import escape

from toolkit.commands.common import positive_number
from toolkit.config.precision import DTYPE_NAMES
from toolkit.export import merging, serving
from toolkit.io import files
from toolkit.model import loading
from toolkit.runs import rundir
from toolkit.ui.report import console, show, write_json


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
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(KB|MB|GB|TB)\s*", text, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"give a size such as 500MB or 5GB, got {text!r}")
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
    recipe = rundir.open_run(run_dir)
    merging.check_output(out, run_dir, args.overwrite)
    dtype = args.dtype or merging.default_dtype(recipe, loading.detect_accelerator())
    quantized_base_note(recipe, dtype)
    staging = merging.staging_dir(out)
    try:
        result = merging.merge(run_dir, recipe, staging, dtype, args.max_shard_size)
        tolerance = args.tolerance
        if tolerance is None:
            tolerance = merging.RELATIVE_TOLERANCE[dtype] * max(1.0, result["max_abs_logit"])
        traces = merging.adapter_traces(staging)
        report = {"run": str(run_dir), "dtype": dtype, "quantization_of_training_base": recipe.quantization.mode,
                  **result, "tolerance": tolerance, "passed": merging.passes(result, tolerance, traces)}
        show_result(out, report)
        if not report["passed"]:
            return verdict(out, report, traces)
        write_json(staging / merging.REPORT_FILE, report)
        # SERVING.md and a Modelfile, swapped in with the model
        serving.write_serving_files(staging, out.name, dtype, str(run_dir), recipe.data.vision_tiles)
        files.write_marker(staging, merging.KIND, complete=True)
        with merging.finishing():
            merging.put_in_place(staging, out, args.overwrite)
            return verdict(out, report, traces)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when it was put in place




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
    where = escape(str(out))
    if traces:
        console.print(f"[bold red]error:[/] the merged model is not a plain model (loading it would need PEFT or a "
                      f"quantizer): {escape(', '.join(traces))}; nothing was written to {where}", soft_wrap=True)
        return 1
    if not report["passed"]:
        hint = "" if report["dtype"] == "fp32" else " (--dtype fp32 rounds less; --tolerance if this is expected)"
        console.print(f"[bold red]error:[/] the merged model differs from base + adapter by "
                      f"{report['max_abs_delta']:.3g}, not within tolerance {report['tolerance']:.3g}; do not use "
                      f"it. Nothing was written to {where}{hint}", soft_wrap=True)
        return 1
    if report["adapter_effect"] <= report["tolerance"]:
        console.print(f"[yellow]note:[/] the adapter moves logits by at most {report['adapter_effect']:.3g}, within "
                      "the tolerance, so this check cannot tell the merged model from the base; --dtype fp32 can",
                      soft_wrap=True)
    console.print(f"Merged model in [bold]{where}[/]: loads with from_pretrained, no PEFT needed.", soft_wrap=True)
    return 0
