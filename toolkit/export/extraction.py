"""A run's adapter weights as one plain state_dict file, read back and checked before it is put in place.

The keys are PEFT's own (`get_peft_model_state_dict` of the loaded run), so the file loads back with
`set_peft_model_state_dict` or any tool that knows PEFT's naming. The adapter config is written beside it, because
the weights alone do not say which modules they wrap or how they are scaled. `toolkit extract` is this plus its
arguments and printing.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from toolkit.errors import ToolkitError
from toolkit.io import files
from toolkit.runs import rundir

SUFFIXES = {"safetensors": ".safetensors", "pt": ".pt"}
DEFAULT_NAME = "adapter_state_dict"
PT_SUFFIXES = (".pt", ".pth", ".bin")
WRITTEN_BY = "toolkit extract"


@dataclass(frozen=True)
class Extracted:
    """What `extract` wrote: the state_dict file, its format, the adapter config beside it, and how many tensors
    and parameters the file holds (all of them read back identical to the adapter's)."""

    path: Path
    format: str
    adapter_config: Path
    tensors: int
    parameters: int


def choose_format(output: str | None, requested: str | None) -> str:
    """An explicit --format wins; otherwise a .pt/.pth/.bin output means torch.save, anything else safetensors.
    A format that contradicts the file name's suffix is refused: the name would lie about the contents."""
    suffix = Path(output).suffix.lower() if output else ""
    implied = "pt" if suffix in PT_SUFFIXES else "safetensors" if suffix == ".safetensors" else None
    if requested and implied and requested != implied:
        raise ToolkitError(f"--format {requested} does not match the name {output} ({suffix} is {implied}); "
                           "change one of them")
    return requested or implied or "safetensors"


def output_paths(run_dir: Path, output: str | None, fmt: str) -> tuple[Path, Path]:
    """The state_dict file and its adapter config beside it (`<stem>.adapter_config.json`), never in the run."""
    default = run_dir.resolve().parent / f"{run_dir.resolve().name}-{DEFAULT_NAME}{SUFFIXES[fmt]}"
    path = files.expand(output) if output else default
    if path.is_dir():
        example = path / f"{DEFAULT_NAME}{SUFFIXES[fmt]}"
        raise ToolkitError(f"--output {path} is a directory; give a file name, e.g. {example}")
    if run_dir.resolve() in path.resolve().parents:
        raise ToolkitError(f"--output {path} is inside the run directory {run_dir}; the toolkit never writes into "
                           "the run it reads. Choose a path outside it")
    return path, path.with_name(f"{path.stem}.adapter_config.json")


def written_by_extract(path: Path) -> bool:
    """Whether an existing file is one this command wrote: an adapter state_dict or an adapter config."""
    import torch
    from safetensors import safe_open

    try:
        if path.name.endswith(".adapter_config.json"):
            return "peft_type" in json.loads(path.read_text(encoding="utf-8"))
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                return (handle.metadata() or {}).get("written_by") == WRITTEN_BY
        state = torch.load(path, map_location="cpu", weights_only=True)
        return isinstance(state, dict) and bool(state) and all("lora_" in str(key) for key in state)
    except Exception:  # unreadable in any way: not ours
        return False


def check_outputs(paths: tuple[Path, Path], overwrite: bool) -> None:
    """Before any slow work: existing outputs need --overwrite and must be extract's own; the folder writable."""
    for path in paths:
        if not path.exists():
            continue
        if not overwrite:
            raise ToolkitError(f"{path} exists; pass --overwrite to replace it or choose another --output")
        if not written_by_extract(path):
            raise ToolkitError(f"{path} exists and was not written by toolkit extract; --overwrite only replaces "
                               "extract's own files. Remove it yourself or choose another --output")
    parent = paths[0].resolve().parent
    while not parent.exists():
        parent = parent.parent
    if not files.writable(parent):
        raise ToolkitError(f"cannot write {paths[0]}: {parent} is not writable")


def adapter_state_dict(run_dir: Path) -> dict:
    """The adapter's tensors as PEFT names them, on the CPU and contiguous (safetensors needs both)."""
    from peft import get_peft_model_state_dict

    model, _, _ = rundir.load_trained(run_dir)
    return {key: tensor.detach().to("cpu").contiguous() for key, tensor in get_peft_model_state_dict(model).items()}


def write_state_dict(tensors: dict, path: Path, fmt: str) -> None:
    import torch
    from safetensors.torch import save_file

    if fmt == "safetensors":
        save_file(tensors, str(path), metadata={"format": "pt", "written_by": WRITTEN_BY})
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


def extract(run_dir: Path, output: str | None = None, fmt: str | None = None, overwrite: bool = False) -> Extracted:
    """Write the run's adapter state_dict to `output` (default: beside the run) and its adapter config beside it,
    each staged and put in place only once the file reads back as the adapter (keys, dtype, shape, values).

    Refuses, before any model loads: a folder that is not a finished run, a format that contradicts the name, an
    output that is a directory or inside the run, an existing output without `overwrite` or not extract's own, an
    unwritable folder; after loading: an adapter with no tensors, a file that does not read back identically
    (nothing is written then)."""
    rundir.open_run(run_dir)  # a clear error before any model is loaded
    fmt = choose_format(output, fmt)
    path, config_path = output_paths(run_dir, output, fmt)
    check_outputs((path, config_path), overwrite)
    tensors = adapter_state_dict(run_dir)
    if not tensors:
        raise ToolkitError(f"{run_dir}: the adapter has no tensors; is adapter_model.safetensors complete?")
    path.parent.mkdir(parents=True, exist_ok=True)
    with files.staged_file(path, replace=overwrite) as staged, \
            files.staged_file(config_path, replace=overwrite) as staged_config:
        write_state_dict(tensors, staged, fmt)
        shutil.copyfile(run_dir / rundir.ADAPTER_CONFIG, staged_config)
        problems = mismatches(tensors, read_state_dict(staged, fmt))
        if problems:  # raising keeps the staged files from being renamed into place
            listed = "\n".join(f"  {p}" for p in problems[:10])
            raise ToolkitError(f"the written file does not read back as the adapter ({len(problems)} problem(s)); "
                               f"nothing was written to {path}:\n{listed}")
    return Extracted(path, fmt, config_path, len(tensors), sum(t.numel() for t in tensors.values()))
