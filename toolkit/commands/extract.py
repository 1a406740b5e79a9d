"""`toolkit extract RUN_DIR`: the run's adapter weights as one plain state_dict file, read back and checked
(`toolkit.export.extraction`)."""

from __future__ import annotations

import argparse

from toolkit.export import extraction
from toolkit.io import files
from toolkit.ui.report import console, show


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolkit extract",
                                     description="Write a run's adapter state_dict to one file.")
    parser.add_argument("run_dir", help="a finished run directory (from toolkit sft)")
    parser.add_argument("--output", help=f"file to write (default: beside the run, RUN-{extraction.DEFAULT_NAME}"
                                         ".safetensors or .pt)")
    parser.add_argument("--format", choices=sorted(extraction.SUFFIXES),
                        help="safetensors or pt (torch.save); default: from --output's suffix, else safetensors")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing output that an earlier toolkit extract wrote")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    show_result(extraction.extract(files.expand(args.run_dir), args.output, args.format, args.overwrite))
    return 0


def show_result(done: extraction.Extracted) -> None:
    """One row per fact, so long paths are shown whole."""
    show("Adapter extracted", ["item", "value"], [
        ["file", str(done.path)],
        ["format", done.format],
        ["tensors", done.tensors],
        ["parameters", done.parameters],
        ["size MB", f"{done.path.stat().st_size / 1e6:.3f}"],
        ["adapter config", str(done.adapter_config)],
    ])
    console.print(f"Read back: all {done.tensors} tensors identical (keys, dtype, shape, values).")
