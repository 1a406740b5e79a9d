"""Merging a run's adapter into its base model, verified: the merged model is saved into a staging folder, loaded
back the plain way (no PEFT) and must reproduce base + adapter's logits within a tolerance before it replaces the
output folder. `toolkit merge` is this (`start`, then `merge_run`) plus its arguments and printing."""

from __future__ import annotations

import errno
import gc
import json
import math
import os
import re
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from toolkit.config.precision import DTYPE_NAMES, resolve_precision
from toolkit.data import encode, formatters, reading
from toolkit.errors import ToolkitError
from toolkit.evaluation import generation
from toolkit.export import serving
from toolkit.io import files
from toolkit.model import loading, lora, vision_tower
from toolkit.runs import rundir
from toolkit.ui.report import console, write_json

# Default tolerance on max |Δlogit|, as a share of the largest |logit|: rounding error grows with magnitude. Measured
# merged vs unmerged on CPU, as a share of the largest |logit| (fp32 / fp16 / bf16): tiny Mllama 5e-7 / 8e-4 / 6e-3;
# random 24- and 32-layer Llamas scaled to logits ~25 with LoRA r=16 on all projections 1.5e-6 / 3.5e-3 / 3.3e-2.
# The defaults leave about 70x / 3x / 3x of margin over the deep models.
RELATIVE_TOLERANCE = {"fp32": 1e-4, "fp16": 1e-2, "bf16": 1e-1}


VERIFY_ROWS = 4


FALLBACK_QUESTION = "다음 건설 용어를 설명하세요.\n\n거푸집"


REPORT_FILE = "merge_report.json"


KIND = "merged"


class CheckFailed(ToolkitError):
    """The merged model does not reproduce base + adapter, or is not a plain model: nothing was written to the
    output. The message is the one line `toolkit merge` prints (it exits 1); `report` holds the numbers measured
    and `traces` what would make loading it reach for PEFT or a quantizer."""

    def __init__(self, message: str, report: dict, traces: list[str]):
        super().__init__(message)
        self.report, self.traces = report, traces


def shard_size_problem(text: str) -> str | None:
    """What is wrong with a --max-shard-size value (None when it is a size such as 500MB), checked before merging
    rather than when the shards are written."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(KB|MB|GB|TB)\s*", text, flags=re.IGNORECASE)
    if not match or float(match.group(1)) <= 0:
        return f"give a size such as 500MB or 5GB, got {text!r}"
    return None


def start(run_dir: Path, out: Path, dtype: str | None = None, overwrite: bool = False, tolerance: float | None = None,
          max_shard_size: str = "5GB"):
    """Every refusal that needs no model, before any loads: (the run's recipe, the dtype to merge in)."""
    if dtype is not None and dtype not in DTYPE_NAMES:
        raise ToolkitError(f"--dtype {dtype}: choose one of {', '.join(sorted(DTYPE_NAMES))}")
    if tolerance is not None and not (math.isfinite(tolerance) and tolerance > 0):
        raise ToolkitError(f"--tolerance: must be a positive number, got {tolerance}")
    problem = shard_size_problem(max_shard_size)
    if problem:
        raise ToolkitError(f"--max-shard-size: {problem}")
    recipe = rundir.open_run(run_dir)
    check_output(out, run_dir, overwrite)
    return recipe, dtype or default_dtype(recipe, loading.detect_accelerator())


def check_output(out: Path, run_dir: Path, overwrite: bool) -> None:
    """Refuse before any slow work: a file, the run itself (or a folder inside or around it), a non-empty folder
    without --overwrite, and with --overwrite anything but a merged model the toolkit made."""
    if out.exists() and not out.is_dir():
        raise ToolkitError(f"--output {out} is a file; give a directory")
    resolved, run = out.resolve(), run_dir.resolve()
    if resolved == run or resolved in run.parents or run in resolved.parents:
        raise ToolkitError(f"--output {out} overlaps the run directory {run_dir}; choose a folder outside it")
    if files.entries(out):
        if not overwrite:
            raise ToolkitError(f"--output {out} is not empty; pass --overwrite to replace it")
        files.check_replaceable(out, KIND, "--output")
    parent = resolved.parent
    while not parent.exists():
        parent = parent.parent
    if not files.writable(parent):
        raise ToolkitError(f"--output {out}: {parent} is not writable")
    check_name_length(out, parent)


def helper_names(out: Path) -> list[str]:
    """The sibling folders a merge makes beside `out`: the one it builds in, and the old model's while it is
    swapped out (see `staging_dir` and `put_in_place`)."""
    return [f".{out.name}.merging-XXXXXXXX", f".{out.name}.replaced-{os.getpid()}"]


def check_name_length(out: Path, existing: Path) -> None:
    """Refuse, naming the user's path, an --output whose name (or the folder built beside it) is longer than the
    file system allows, instead of failing later on a hidden folder's name."""
    try:
        limit = os.pathconf(existing, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    longest = max(len(name.encode("utf-8")) for name in [out.name, *helper_names(out)])
    if longest > limit:
        room = limit - (longest - len(out.name.encode("utf-8")))
        raise ToolkitError(f"--output {out}: the name is too long; the merge builds the model beside it in a folder "
                           f"named after it, and this file system allows {limit} bytes per name, so choose a name of "
                           f"at most {room} bytes")


def default_dtype(recipe, device) -> str:
    """The dtype the run's base weights were in: model.dtype, else train.precision, else what `auto` picks here."""
    if recipe.model.dtype != "auto":
        return recipe.model.dtype
    if recipe.train.precision != "auto":
        return recipe.train.precision
    return resolve_precision("auto", device)


def load_unmerged(run_dir: Path, recipe, dtype: str, device):
    """Base (never quantized) in `dtype` + the run's adapter. sdpa: the kernel does not touch weights, runs anywhere."""
    model_section = recipe.model.model_copy(update={"dtype": dtype, "attn_implementation": "sdpa"})
    return rundir.attach_adapter(run_dir, recipe.model_copy(update={"model": model_section}), dtype, device,
                               quantize=False)


def data_rows(recipe) -> list[reading.Row]:
    """The run's eval rows (train rows if it has none) that can still be read; [] if the files have moved."""
    rows = []
    for path in reading.file_list(recipe.data.eval) or reading.file_list(recipe.data.train):
        if Path(path).exists():  # a file, or a folder saved by datasets
            rows += reading.parse_rows(Path(path), recipe.data)[0]
    return rows


def adapter_reads_images(model) -> bool:
    """Whether the adapter sits where only image rows reach: cross-attention layers or the vision tower."""
    cross = lora.cross_attention_layers(model.config)
    return any("lora_A" in name and lora.part_of(name, cross) in ("cross-attention", "vision")
               for name, _ in model.named_modules())


def verify_prompts(recipe, tokenizer, with_image: bool, scratch: Path) -> list:
    """A few of the run's own prompts, and image prompts too when the adapter reads images (otherwise those
    adapters would go unchecked); fixed prompts when the data files have moved."""
    rows = data_rows(recipe)
    has_image = [bool(formatters.images_in(reading.conversation(r, recipe.data))) for r in rows]
    text_rows = [r for r, image in zip(rows, has_image) if not image][:VERIFY_ROWS]
    image_rows = [r for r, image in zip(rows, has_image) if image][:VERIFY_ROWS]
    prompts = [encode.prompt(row, recipe.data, tokenizer) for row in text_rows + (image_rows if with_image else [])]
    if not text_rows:
        console.print("[yellow]note:[/] the run's data files were not found; verifying on a fixed prompt",
                      soft_wrap=True)
        prompts.insert(0, encode.question_prompt(FALLBACK_QUESTION, recipe.data, tokenizer))
    if with_image and not image_rows:
        prompts.append(encode.question_prompt(FALLBACK_QUESTION, recipe.data.model_copy(update={"system_prompt": None}),
                                            tokenizer, str(fallback_image(scratch))))
    return prompts


def fallback_image(folder: Path) -> Path:
    """A small drawn image for checking image prompts when the run's own images are not at hand."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (96, 64), (235, 235, 235))
    ImageDraw.Draw(image).rectangle((16, 12, 80, 52), outline=(40, 40, 40), width=4)
    path = folder / "verify.png"
    image.save(path)
    return path


def logits(model, batches: list[dict]) -> list:
    import torch

    device = next(model.parameters()).device
    with torch.no_grad():
        return [model(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu() for batch in batches]


def max_delta(a: list, b: list) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def save_merged(merged, run_dir: Path, recipe, out: Path, max_shard_size: str) -> None:
    """Weights (safetensors shards; transformers 5 writes nothing else), processor, tokenizer, generation config."""
    merged.save_pretrained(out, max_shard_size=max_shard_size)
    processor = loading.load_processor(recipe.model.name, recipe.model.revision)
    if processor is not None:
        processor.save_pretrained(out)
    rundir.run_tokenizer(run_dir).save_pretrained(out)  # the run's own, over the processor's copy
    if getattr(merged, "generation_config", None) is not None:
        merged.generation_config.save_pretrained(out)
    files.share_like_plain_files(out)


def config_keys(node) -> list[str]:
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in [key, *config_keys(value)]]
    return []


def adapter_traces(out: Path) -> list[str]:
    """What would make transformers reach for PEFT (or a quantizer) when loading the merged folder."""
    found = [p.name for p in out.iterdir() if p.name.startswith("adapter_")]
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    found += [f"config.json key '{key}'" for key in config_keys(config)
              if "peft" in key.lower() or "adapter" in key.lower() or key == "quantization_config"]
    return found


def load_saved(out: Path, dtype: str, device):
    """The merged folder loaded the plain way, as a user without PEFT would."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(out)
    model = loading.model_class(config).from_pretrained(out, dtype=getattr(torch, DTYPE_NAMES[dtype]))
    return model.to("cuda" if device.cuda else "cpu").eval()


def merge(run_dir: Path, recipe, out: Path, dtype: str, max_shard_size: str) -> dict:
    """Merge, save into `out`, reload and measure; returns the numbers the verdict is made from."""
    tokenizer = rundir.run_tokenizer(run_dir)  # before the model: damaged files fail in a second
    device = loading.detect_accelerator()
    model = load_unmerged(run_dir, recipe, dtype, device)
    with tempfile.TemporaryDirectory(prefix="toolkit-merge-") as scratch:
        prompts = verify_prompts(recipe, tokenizer, adapter_reads_images(model), Path(scratch))
        images = rundir.image_inputs(recipe, tokenizer) if any(p.images for p in prompts) else None
        batches = [generation.prompt_batch(tokenizer, [p], "cpu", images) for p in prompts]
    reference = logits(model, batches)
    with model.disable_adapter():
        adapter_effect = max_delta(logits(model, batches), reference)
    merged = model.merge_and_unload()
    save_merged(merged, run_dir, recipe, out, max_shard_size)
    del merged, model
    gc.collect()
    reloaded = load_saved(out, dtype, device)
    vision_tower.prepare(reloaded, recipe.data.vision_tiles,  # the run's tiling
                         loading.attention_kernel(recipe, device, training=False))
    return {
        "max_abs_delta": max_delta(logits(reloaded, batches), reference),
        "adapter_effect": adapter_effect,
        "max_abs_logit": max(r.abs().max().item() for r in reference),
        "prompts": len(prompts),
        "image_prompts": sum(bool(p.images) for p in prompts),
        "tokens": sum(len(p.input_ids) for p in prompts),
    }


def staging_dir(out: Path) -> Path:
    """A fresh sibling of `out` to build the merged model in; it replaces `out` only once it has passed."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.merging-", dir=out.parent))
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:
            raise ToolkitError(f"--output {out}: the path is too long for this file system; choose a shorter one"
                               ) from None
        raise
    staging.chmod(files.usual_mode(directory=True))  # it becomes `out`: readable as a mkdir'd folder would be
    files.write_marker(staging, KIND, complete=False)
    return staging


def put_in_place(staging: Path, out: Path, overwrite: bool) -> None:
    """Swap the verified model into `out`; an old merged model there (checked to be ours, again, since another
    process may have written it while this one merged) is removed after."""
    old = None
    if files.entries(out) and not overwrite:
        raise ToolkitError(f"--output {out} was filled while this merge ran (another process?); nothing was "
                           "replaced. Pass --overwrite to replace it or choose another directory")
    if out.exists():
        files.check_replaceable(out, KIND, "--output")
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        os.replace(out, old)
    os.replace(staging, out)
    if old is not None:
        shutil.rmtree(old)


def merge_run(run_dir: Path, out: Path, recipe, dtype: str, tolerance: float | None = None,
              max_shard_size: str = "5GB", overwrite: bool = False) -> dict:
    """Merge into a staging folder beside `out`, reload it the plain way and compare its logits with base +
    adapter's; only a model within `tolerance` (default: `RELATIVE_TOLERANCE` of the largest |logit|) is given its
    report, serving notes and marker and put in place of `out`. Returns the report (merge_report.json's content).
    Raises `CheckFailed` (nothing written to `out`) when the check fails; the staging folder never stays."""
    staging = staging_dir(out)
    try:
        result = merge(run_dir, recipe, staging, dtype, max_shard_size)
        if tolerance is None:
            tolerance = RELATIVE_TOLERANCE[dtype] * max(1.0, result["max_abs_logit"])
        traces = adapter_traces(staging)
        report = {"run": str(run_dir), "dtype": dtype, "quantization_of_training_base": recipe.quantization.mode,
                  **result, "tolerance": tolerance, "passed": passes(result, tolerance, traces)}
        problem = failure(out, report, traces)
        if problem:
            raise CheckFailed(problem, report, traces)
        write_json(staging / REPORT_FILE, report)
        # SERVING.md and a Modelfile, swapped in with the model
        serving.write_serving_files(staging, out.name, dtype, str(run_dir), recipe.data.vision_tiles)
        files.write_marker(staging, KIND, complete=True)
        with finishing():
            put_in_place(staging, out, overwrite)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already when it was put in place


def failure(out: Path, report: dict, traces: list[str]) -> str | None:
    """Why the merged model must not be used (one line), or None when it reproduces base + adapter."""
    if traces:
        return (f"the merged model is not a plain model (loading it would need PEFT or a quantizer): "
                f"{', '.join(traces)}; nothing was written to {out}")
    if not report["passed"]:
        hint = "" if report["dtype"] == "fp32" else " (--dtype fp32 rounds less; --tolerance if this is expected)"
        return (f"the merged model differs from base + adapter by {report['max_abs_delta']:.3g}, not within "
                f"tolerance {report['tolerance']:.3g}; do not use it. Nothing was written to {out}{hint}")
    return None


def passes(result: dict, tolerance: float, traces: list[str]) -> bool:
    """Fail closed: NaN compares false with everything, so the check asks for finite numbers within tolerance."""
    delta = result["max_abs_delta"]
    return math.isfinite(delta) and math.isfinite(result["max_abs_logit"]) and delta <= tolerance and not traces


@contextmanager
def finishing():
    """Ctrl-C is ignored from the moment the verified model starts moving into place until it is in place: the
    merge then finishes and exits 0, instead of stopping with the output already complete (or half swapped)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
