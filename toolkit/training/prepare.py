"""Everything that can be checked before a model's weights load: recipe, data, encoding, lengths, LoRA targets.

`toolkit validate` runs exactly this; `toolkit sft` runs it first, so a bad recipe or file fails in seconds and
leaves no run directory behind. The rows are encoded here once (`toolkit.data.encode`), and training uses these very
ids and masks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from rich.markup import escape

from toolkit.config import quantization
from toolkit.config.precision import Accelerator, resolve_precision
from toolkit.data import datastore, encode, reading, replay, vision
from toolkit.errors import ToolkitError
from toolkit.io import files
from toolkit.model import builtin, loading, lora
from toolkit.training import trackers
from toolkit.ui.report import console, show


@dataclass(frozen=True)
class Prepared:
    """The checked plan a recipe becomes: what `validate` reports and `sft` trains. `prepare` builds it complete;
    it is never changed in place (fields cannot be assigned), so a plan handed to `toolkit.api.train` or kept by a
    notebook still says what it said. A changed plan is a new one: `dataclasses.replace(plan, recipe=...)`."""

    recipe: object
    device: Accelerator
    precision: str
    tokenizer: object
    model_config: object
    train: encode.Encoding  # or a datastore.StoredEncoding: the same fields, read from the memory-mapped cache
    eval: encode.Encoding
    data_note: str = ""  # whether the encoded data came from the cache
    lora_modules: tuple[str, ...] = ()  # what the recipe's LoRA wraps, checked on a weightless model
    image_spec: vision.ImageSpec | None = None
    image_tiles: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))  # content tiles per image
    replay: replay.Replay | None = None  # general rows mixed into train (data.replay)

    @property
    def train_rows(self) -> list:
        return self.train.rows

    @property
    def eval_rows(self) -> list:
        return self.eval.rows

    @property
    def lengths(self) -> list[int]:
        """Token counts of the training rows as trained (after any cut), in row order."""
        if hasattr(self.train, "trained_lengths"):
            return self.train.trained_lengths.tolist()
        return [len(e.input_ids) for e in self.train.examples]


def check_kernels(train, device: Accelerator) -> None:
    if not train.liger_kernel:
        return
    if not device.cuda:
        raise ToolkitError("train.liger_kernel=true needs a CUDA GPU; set it to false on CPU")
    from importlib.util import find_spec

    if find_spec("liger_kernel") is None:
        raise ToolkitError("train.liger_kernel=true needs liger-kernel: pip install 'toolkit[gpu]'")


def check_rows_left(encoding: encode.Encoding, limit: int, key: str) -> None:
    if not encoding.rows and encoding.dropped:
        raise ToolkitError(f"{key}: all {encoding.dropped} rows were dropped by train.max_seq_length={limit} "
                           f"(data.too_long); raise the limit or shorten the rows")


def prepare(recipe, device: Accelerator | None = None) -> Prepared:
    device = device or loading.detect_accelerator()
    precision = resolve_precision(recipe.train.precision, device)
    check_kernels(recipe.train, device)
    check_attention(recipe, device, precision)
    check_fp8(recipe, device, precision)
    trackers.check_installed(recipe.train.report_to)
    reading.check_files(recipe.data)
    model_config = loading.load_config(recipe.model.name, recipe.model.revision)
    tokenizer = loading.load_tokenizer(recipe.model.name, recipe.model.revision)
    limit = recipe.train.max_seq_length
    store = datastore.prepare_data(recipe.data, tokenizer, limit)
    train, evals = datastore.split_encodings(store, recipe.data, recipe.train.seed)
    check_rows_left(train, limit, "data.train")
    train, mixed = replay.mix(train, recipe.data, tokenizer, limit, recipe.train.seed)
    if recipe.train.sample_every is not None:  # toolkit.training.samples imports the Trainer, seconds validate need not spend
        from toolkit.training import samples

        samples.check_recipe(recipe, evals.rows)
    if train.image_rows or evals.image_rows:
        check_text_only_settings(recipe, train.image_rows + evals.image_rows)
        spec, tiles = measure_images(recipe, tokenizer, model_config, train, evals)
    else:
        spec, tiles = None, {}
    return Prepared(recipe, device, precision, tokenizer, model_config, train, evals, store.note,
                    lora_modules=tuple(lora_targets(recipe, model_config)), image_spec=spec,
                    image_tiles=MappingProxyType(tiles), replay=mixed)


TARGETS_VERSION = 1  # raise when what lora_targets computes changes in a way its key does not show


def lora_targets(recipe, model_config) -> list[str]:
    """The module names the recipe's LoRA wraps, checked on a weightless meta model (and quantization.skip_modules
    against its linear layers), or remembered from an earlier check of the same inputs.

    Building the meta model and running PEFT on it needs torch, the model's code, PEFT and bitsandbytes imported:
    most of what `validate` spent on a small data set. The answer depends only on the model config, the recipe's
    `lora` and `quantization` sections, the transformers, PEFT and torch versions and the toolkit's own code that
    computes it (`toolkit/model/lora.py`, `toolkit/model/loading.py`), so it is kept in `$TOOLKIT_CACHE/lora-targets/` under a
    digest of all of them. Only a check that passed is kept; an unreadable or foreign file is checked again.
    """
    key = targets_key(recipe, model_config)
    path = builtin.cache_root() / "lora-targets" / f"{key}.json"
    try:
        kept = json.loads(path.read_text(encoding="utf-8"))
        modules = kept["modules"]
        if kept["key"] == key and isinstance(modules, list) and modules and all(isinstance(m, str) for m in modules):
            return modules
    except (OSError, ValueError, KeyError, TypeError):
        pass
    meta = loading.meta_model(model_config)
    quantization.check_skip_modules(recipe.quantization, meta)  # before LoRA renames the wrapped layers
    modules = lora.resolve_targets(meta, recipe.lora)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_text_atomic(path, json.dumps({"key": key, "modules": modules}))
    except OSError:
        pass  # a cache that cannot be written only costs the time
    return modules


def targets_key(recipe, model_config) -> str:
    import hashlib
    from importlib.metadata import PackageNotFoundError, version

    def installed(package: str) -> str | None:
        try:
            return version(package)
        except PackageNotFoundError:
            return None

    digest = hashlib.blake2b(digest_size=16)
    parts = [str(TARGETS_VERSION), model_config.to_json_string(use_diff=False),
             json.dumps(recipe.lora.model_dump(mode="json"), sort_keys=True),
             json.dumps(recipe.quantization.model_dump(mode="json"), sort_keys=True),
             json.dumps({p: installed(p) for p in ("transformers", "peft", "torch")}, sort_keys=True)]
    for part in parts:
        digest.update(part.encode("utf-8", "surrogatepass") + b"\0")
    for module in (lora, loading):
        digest.update(Path(module.__file__).read_bytes() + b"\0")
    return digest.hexdigest()


def held_out_rows(recipe) -> list:
    """The rows `data.eval_fraction` held out of this recipe's training data, every one of them (also those the
    length limit dropped), from the encoded-data cache when training left it there: the same rows
    `reading.load_splits` gives, without reading and checking the whole training data again."""
    reading.check_files(recipe.data)
    tokenizer = loading.load_tokenizer(recipe.model.name, recipe.model.revision)
    store = datastore.prepare_data(recipe.data, tokenizer, recipe.train.max_seq_length)
    return list(datastore.split_encodings(store, recipe.data, recipe.train.seed)[1].all_rows)


def check_attention(recipe, device: Accelerator, precision: str) -> None:
    """The attention kernels that train on a GPU only, refused before anything loads where they cannot:
    `flex_attention` on the CPU, and `varlen` anywhere but padding-free batches in bf16 or fp16 on a CUDA GPU whose
    PyTorch has the kernel."""
    if recipe.model.attn_implementation == "flex_attention" and not device.cuda:
        raise ToolkitError("model.attn_implementation=flex_attention trains on a CUDA GPU only (PyTorch has no "
                           "FlexAttention backward on the CPU); use sdpa on CPU")
    if recipe.model.attn_implementation != "varlen":
        return
    import torch

    from toolkit.model import varlen

    if not recipe.train.padding_free:
        raise ToolkitError("model.attn_implementation=varlen reads padding-free batches only; set "
                           "train.padding_free: true or use sdpa")
    if not device.cuda or not varlen.available():
        raise ToolkitError("model.attn_implementation=varlen trains on a CUDA GPU of compute capability 8.0 or "
                           "later with PyTorch 2.10 or later (this machine: "
                           f"{'no CUDA GPU' if not device.cuda else 'torch ' + torch.__version__ + ' on ' + device.name}"
                           "); use auto or sdpa")
    if precision == "fp32":
        raise ToolkitError("model.attn_implementation=varlen computes in bf16 or fp16 (FlashAttention); "
                           "train.precision is fp32: use auto or flex_attention")


def check_fp8(recipe, device: Accelerator, precision: str) -> None:
    """`train.fp8_matmuls` refused before anything loads where FP8 matmuls cannot run: no GPU of compute capability
    8.9 or later, or a precision other than bf16 (the products are written in bf16)."""
    mode = recipe.train.fp8_matmuls
    if mode == "none":
        return
    import torch

    from toolkit.model import fastlora, fp8

    if not device.cuda or not fp8.available():
        where = "no CUDA GPU" if not device.cuda else f"{device.name}, compute capability " + \
            ".".join(map(str, torch.cuda.get_device_capability()))
        raise ToolkitError(f"train.fp8_matmuls={mode} needs a CUDA GPU of compute capability 8.9 or later "
                           f"(H100, H200, L40S, ...); this machine: {where}; set it to none")
    if precision != "bf16":
        raise ToolkitError(f"train.fp8_matmuls={mode} writes its products in bf16; train.precision is {precision}: "
                           "use bf16 or auto, or set fp8_matmuls: none")
    problem = fastlora.fp8_problem(recipe)
    if problem:
        raise ToolkitError(problem)


def check_text_only_settings(recipe, image_rows: int) -> None:
    """Refuse, before any weight loads, what works for text rows only: padding-free batches (image batches carry
    pixel tensors and masks per row, which TRL's padding-free collator cannot lay end to end) and flex attention
    (the vision tower's tile mask is made for SDPA and eager)."""
    if recipe.train.padding_free:
        raise ToolkitError(f"train.padding_free is for text rows; {image_rows} rows have images: set it to false")
    if recipe.model.attn_implementation == "flex_attention":
        raise ToolkitError(f"model.attn_implementation=flex_attention is for text rows; {image_rows} rows have "
                           "images: use sdpa")


def measure_images(recipe, tokenizer, model_config, train, evals) -> tuple[vision.ImageSpec, dict[str, int]]:
    """Check the model can read images; (the image spec under the recipe's tile cap, how many tiles each image
    fills)."""
    if not loading.is_vision_config(model_config):
        raise ToolkitError(f"{train.image_rows + evals.image_rows} rows have images, but "
                           f"{recipe.model.name} is not a vision model; use Llama 3.2 Vision or drop the images")
    processor = loading.load_processor(recipe.model.name, recipe.model.revision)
    if processor is None:
        raise ToolkitError(f"{recipe.model.name} has no image processor (processor_config.json); the checkpoint "
                           "folder is incomplete")
    check_image_token(tokenizer, model_config, recipe.model.name)
    spec = vision.image_spec(processor, model_config, recipe.data.max_image_tiles)
    paths = set(datastore.unique_images({"train": train.table, "eval": evals.table}))
    return spec, {p: vision.tiles_for(vision.image_size(p), spec) for p in sorted(paths)}


def check_image_token(tokenizer, model_config, name: str) -> None:
    """The tokenizer's `<|image|>` must be the id the model reads images at (`image_token_index`): otherwise the
    cross-attention mask is built from one id and the model looks for another, and images are silently ignored or
    the embedding lookup fails."""
    expected = getattr(model_config, "image_token_index", None)
    found = tokenizer.convert_tokens_to_ids(vision.IMAGE_TOKEN) if vision.IMAGE_TOKEN in tokenizer.get_vocab() \
        else None
    if found != expected:
        where = f"id {found}" if found is not None else "no such token"
        raise ToolkitError(f"{name}: the tokenizer's {vision.IMAGE_TOKEN} is {where} but the model's config says "
                           f"image_token_index={expected}; the checkpoint's tokenizer and config do not belong "
                           "together (use the tokenizer files that came with the model)")


def image_note(p: Prepared) -> str:
    spec = p.image_spec
    images = p.train.images_total
    tiles = encode.percentiles(list(p.image_tiles.values()))
    return (f"{p.train.image_rows} train rows with {images} images; tiles/image p50 {tiles['p50']} max "
            f"{tiles['p100']} (cap {spec.max_tiles} of {spec.model_max_tiles}); vision tokens/image "
            f"{vision_tokens_note(p)}")


def vision_tokens_note(p: Prepared) -> str:
    spec = p.image_spec
    if p.recipe.data.vision_tiles == "filled":
        largest = max(p.image_tiles.values(), default=1)
        return (f"{spec.patches_per_tile:,} per tile filled, up to {largest * spec.patches_per_tile:,} "
                f"(data.vision_tiles: filled runs only the tiles a batch's images fill)")
    return (f"{spec.vision_tokens_per_image:,} (the vision tower runs every image as the model's "
            f"{spec.model_max_tiles} tile{'s' if spec.model_max_tiles > 1 else ''}; data.vision_tiles: filled "
            f"runs only the tiles an image fills)")


def length_note(encoding: encode.Encoding, limit: int) -> str:
    import numpy as np

    over = int(np.sum(np.asarray(encoding.lengths) > limit))
    parts = [f"{over} over {limit}"]
    if encoding.truncated:
        parts.append(f"{encoding.truncated} cut to {limit}")
    if encoding.dropped_long:
        parts.append(f"{encoding.dropped_long} dropped")
    if encoding.dropped_empty:
        parts.append(f"{encoding.dropped_empty} dropped (no answer token left after the cut)")
    if encoding.dropped_image:
        parts.append(f"{encoding.dropped_image} dropped (the cut would remove an image)")
    return ", ".join(parts)


def show_plan(p: Prepared) -> None:
    r = p.recipe
    limit = r.train.max_seq_length
    stats = encode.percentiles(p.train.lengths)
    rows = [
        ["model", r.model.name],
        ["device", f"{p.device.name} ({p.precision})"],
        ["quantization", r.quantization.mode + (f"; frozen-weight matmuls in FP8 ({r.train.fp8_matmuls})"
                                                if r.train.fp8_matmuls != "none" else "")],
        ["LoRA", f"r={r.lora.r} alpha={r.lora.alpha:g} dropout={r.lora.dropout:g} scope={r.lora.scope}"],
        ["LoRA modules", str(len(p.lora_modules))],
        ["train rows", f"{len(p.train.rows)} of {len(p.train.lengths)}"],
        ["eval rows", f"{len(p.eval.rows)} of {len(p.eval.lengths)}"],
        ["tokens/row p50 p90 p99 max", " ".join(str(v) for v in stats.values())],
        ["train rows too long", length_note(p.train, limit)],
        ["batch", f"{r.train.batch_size} x {r.train.grad_accum} accumulation"],
        ["output", r.output_dir],
        ["encoded data", p.data_note],
    ]
    if len(p.eval.lengths):
        rows.insert(9, ["eval rows too long", length_note(p.eval, limit)])
    if p.image_spec:
        rows.insert(8, ["images", image_note(p)])
    if p.replay:
        rows.insert(6, ["replay", f"{p.replay.rows} general rows ({p.replay.distinct} different) from "
                                  f"{p.replay.source}: {p.replay.rows / len(p.train.rows):.0%} of train rows"])
    show("Plan", ["setting", "value"], rows)
    special = p.train.special_text + p.eval.special_text
    if special:
        count = p.train.special_rows + p.eval.special_rows
        console.print(f"[yellow]note:[/] {count} row(s) contain special-token text such as <|eot_id|> "
                      f"(first: {escape(special[0])}); it is trained as plain text, never as the token itself",
                      soft_wrap=True)
