"""`toolkit extract RUN_DIR`: the run's adapter weights as one plain state_dict file, read back and checked.

The keys are PEFT's own (`get_peft_model_state_dict` of the loaded run), so the file loads back with
`set_peft_model_state_dict` or any tool that knows PEFT's naming. The adapter config is written beside it, because
the weights alone do not say which modules they wrap or how they are scaled.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from toolkit import runs
from toolkit.errors import ToolkitError
from toolkit.report import console, show

SUFFIXES = {"safetensors": ".safetensors", "pt": ".pt"}
DEFAULT_NAME = "adapter_state_dict"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolkit extract",
                                     description="Write a run's adapter state_dict to one file.")
    parser.add_argument("run_dir", help="a finished run directory (from toolkit sft)")
    parser.add_argument("--output", help=f"file to write (default RUN_DIR/{DEFAULT_NAME}.safetensors or .pt)")
    parser.add_argument("--format", choices=sorted(SUFFIXES),
                        help="safetensors or pt (torch.save); default: from --output's suffix, else safetensors")
    return parser


def choose_format(output: str | None, requested: str | None) -> str:
    """An explicit --format wins; otherwise a .pt/.pth/.bin output means torch.save, anything else safetensors."""
    if requested:
        return requested
    if output and Path(output).suffix.lower() in (".pt", ".pth", ".bin"):
        return "pt"
    return "safetensors"


def output_paths(run_dir: Path, output: str | None, fmt: str) -> tuple[Path, Path]:
    """The state_dict file and its adapter config beside it (`<stem>.adapter_config.json`)."""
    path = Path(output) if output else run_dir / f"{DEFAULT_NAME}{SUFFIXES[fmt]}"
    if path.is_dir():
        example = path / f"{DEFAULT_NAME}{SUFFIXES[fmt]}"
        raise ToolkitError(f"--output {path} is a directory; give a file name, e.g. {example}")
    if path.resolve() == (run_dir / "adapter_model.safetensors").resolve():
        raise ToolkitError(f"--output {path} is the run's own adapter file; choose another name")
    return path, path.with_name(f"{path.stem}.adapter_config.json")


def adapter_state_dict(run_dir: Path) -> dict:
    """The adapter's tensors as PEFT names them, on the CPU and contiguous (safetensors needs both)."""
    from peft import get_peft_model_state_dict

    model, _, _ = runs.load_trained(run_dir)
    return {key: tensor.detach().to("cpu").contiguous() for key, tensor in get_peft_model_state_dict(model).items()}


def write_state_dict(tensors: dict, path: Path, fmt: str) -> None:
    import torch
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        save_file(tensors, str(path), metadata={"format": "pt"})
    else:
        torch.save(tensors, path)


def read_state_dict(path: Path, fmt: str) -> dict:
    """Read the file the way a consumer would: safetensors, or torch.load with weights_only (no pickled code)."""
    import torch
    from safetensors.torch import load_file

    if fmt == "safetensors":
        return load_file(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def mismatches(expected: dict, found: dict) -> list[str]:
    """Every way the file read back differs from the adapter: missing or extra keys, dtype, shape, values."""
    import torch

    problems = [f"{key}: missing from the file" for key in expected if key not in found]
    problems += [f"{key}: in the file but not in the adapter" for key in found if key not in expected]
    for key in expected.keys() & found.keys():
        want, got = expected[key], found[key]
        if want.dtype != got.dtype:
            problems.append(f"{key}: dtype {got.dtype}, expected {want.dtype}")
        elif want.shape != got.shape:
            problems.append(f"{key}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        elif not torch.equal(want, got):
            problems.append(f"{key}: values differ")
    return sorted(problems)


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    run_dir = Path(args.run_dir)
    runs.open_run(run_dir)  # a clear error before any model is loaded
    fmt = choose_format(args.output, args.format)
    path, config_path = output_paths(run_dir, args.output, fmt)
    tensors = adapter_state_dict(run_dir)
    if not tensors:
        raise ToolkitError(f"{run_dir}: the adapter has no tensors; is adapter_model.safetensors complete?")
    write_state_dict(tensors, path, fmt)
    shutil.copyfile(run_dir / "adapter_config.json", config_path)
    problems = mismatches(tensors, read_state_dict(path, fmt))
    if problems:
        listed = "\n".join(f"  {p}" for p in problems[:10])
        console.print(f"[bold red]error:[/] {path} does not read back as the adapter ({len(problems)} problem(s)):\n"
                      f"{listed}", soft_wrap=True)
        return 1
    show_result(path, fmt, tensors, config_path)
    return 0


def show_result(path: Path, fmt: str, tensors: dict, config_path: Path) -> None:
    """One row per fact, so long paths are shown whole."""
    show("Adapter extracted", ["item", "value"], [
        ["file", str(path)],
        ["format", fmt],
        ["tensors", len(tensors)],
        ["parameters", sum(t.numel() for t in tensors.values())],
        ["size MB", f"{path.stat().st_size / 1e6:.3f}"],
        ["adapter config", str(config_path)],
    ])
    console.print(f"Read back: all {len(tensors)} tensors identical (keys, dtype, shape, values).")
