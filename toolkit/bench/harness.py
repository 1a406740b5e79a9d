"""Measuring training speed and memory: synthetic rows or image rows of known lengths through the toolkit's own
trainer, each setup in its own process, timed per optimizer step after warm-up steps that cover the measured shapes.
`toolkit bench` is this (`plan_bench`, then `run_setup` for each setup) plus its arguments and printing."""

from __future__ import annotations

import gc
import json
import random
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import ClassVar

from transformers import TrainerCallback

from toolkit.config.precision import pad_multiple, resolve_precision
from toolkit.config.recipe import apply_overrides, read_yaml, recipe_from_dict
from toolkit.data import vision
from toolkit.data.batching import length_grouped_order
from toolkit.errors import ToolkitError, first_line
from toolkit.model import builtin, loading
from toolkit.training import memory, trainer
from toolkit.training.prepare import check_kernels
from toolkit.ui.report import console

FULL_SIZE_CONFIG = "assets/llama-3.2-11b-vision-instruct.config.json"


RANDOM_WEIGHTS_NAME = "random-llama-3.2-11b-vision"


MIN_SETUP_S = 30  # under --time-limit, a setup is not started with less time than this left


SHAPE_RESIDUE = 16  # Triton specializes integer kernel arguments on divisibility by 16


# The original example: 8-bit (bitsandbytes' LLM.int8() matmul), every row padded to 512, batch 2 x 2, gradient
# checkpointing, LoRA q,k,v,o in both towers through PEFT's own layers. (It also says fp16, which crashes with
# current TRL; precision stays auto here.)
NAMED_SETUPS = {
    "original": [
        "quantization.mode=8bit",
        "quantization.int8_matmul=int8",
        "train.batch_size=2",
        "train.grad_accum=2",
        "train.gradient_checkpointing=true",
        "train.group_by_length=false",
        "train.liger_kernel=false",
        "train.fused_lora=false",
        "train.token_metrics=true",
        "train.max_seq_length=512",
        "lora.scope=all",
        "lora.targets=[q_proj,k_proj,v_proj,o_proj]",
        "bench.pad_to=512",
    ]
}


# What a setup ran like before the fast paths: PEFT's layers, LLM.int8() matmuls, TRL's per-step metrics.
BEFORE_FAST_PATHS = ["train.fused_lora=false", "quantization.int8_matmul=int8", "train.token_metrics=true"]


# Dense bf16 tensor-core peak per GPU (vendor datasheets, FLOP/s), for MFU, by (model, form factor); a form factor
# of None is the SXM board, which CUDA names without one ("NVIDIA H100 80GB HBM3").
PEAK_BF16_FLOPS = {("H200", None): 989.4e12, ("H200", "NVL"): 835.5e12,
                   ("H100", None): 989.4e12, ("H100", "PCIE"): 756.5e12, ("H100", "NVL"): 835.5e12,
                   ("A100", None): 312e12, ("L40S", None): 362.05e12, ("A10", None): 125e12}


def text_params_per_token(text_config) -> int:
    """Weights one text token is multiplied through: self-attention decoder layers and the LM head.

    Cross-attention layers are skipped for rows without an image, and the embedding is a lookup, so neither counts.
    """
    h = text_config.hidden_size
    heads = text_config.num_attention_heads
    kv = getattr(text_config, "num_key_value_heads", heads)
    head_dim = getattr(text_config, "head_dim", None) or h // heads
    attention = h * heads * head_dim * 2 + h * kv * head_dim * 2
    mlp = 3 * h * text_config.intermediate_size
    cross = len(getattr(text_config, "cross_attention_layers", None) or [])
    self_layers = text_config.num_hidden_layers - cross
    return self_layers * (attention + mlp) + h * text_config.vocab_size


def lora_flops_per_token(params: int, recompute: float) -> float:
    """Forward 2P, backward 2P (input gradients only: frozen weights need no weight gradients), +2P to recompute
    activations under gradient checkpointing, times the share of layers checkpointed (`recompute`: True or 1.0 for
    all). LoRA's own matmuls and attention scores add well under 1% here."""
    return (4.0 + 2.0 * float(recompute)) * params


def peak_flops(device_name: str) -> float | None:
    """The peak of the GPU CUDA calls `device_name`, matched by whole words ("A10" is not "A100" or "A10G"; an H100
    PCIe is not an SXM H100); None for a GPU not in the table, so MFU is left out rather than wrong."""
    words = re.split(r"[^A-Z0-9]+", device_name.upper())
    models = [model for model, _ in PEAK_BF16_FLOPS if model in words]
    if not models:
        return None
    form = next((form for model, form in PEAK_BF16_FLOPS if model == models[0] and form in words), None)
    return PEAK_BF16_FLOPS[(models[0], form)]


def step_tokens(records: list[tuple[int, int]], grad_accum: int) -> list[tuple[int, int]]:
    """(real, padded) tokens per optimizer step from per-micro-batch records, in the order batches were drawn."""
    steps = len(records) // grad_accum
    return [
        (sum(r for r, _ in records[i * grad_accum : (i + 1) * grad_accum]),
         sum(p for _, p in records[i * grad_accum : (i + 1) * grad_accum]))
        for i in range(steps)
    ]


def summarize(step_times: list[float], tokens: list[tuple[int, int]], warmup: int, flops_per_token: float,
              peak: float | None) -> dict:
    """Throughput over the measured (post-warm-up) steps: total tokens / total time, the spread of per-step real
    tokens/s (min, median, max), and the median step time."""
    times = step_times[warmup:]
    measured = tokens[warmup : warmup + len(times)]
    times = times[: len(measured)]
    if not times or not measured:
        raise ToolkitError("no measured steps: raise --steps above 0")
    seconds = sum(times)
    real = sum(r for r, _ in measured)
    padded = sum(p for _, p in measured)
    real_rate = real / seconds
    per_step = sorted(r / t for (r, _), t in zip(measured, times))
    return {
        "measured_steps": len(times),
        "median_step_s": statistics.median(times),
        "real_tok_s": real_rate,
        "real_tok_s_min": per_step[0],
        "real_tok_s_median": statistics.median(per_step),
        "real_tok_s_max": per_step[-1],
        "padded_tok_s": padded / seconds,
        "pad_efficiency": real / padded if padded else None,
        "mfu": real_rate * flops_per_token / peak if peak else None,
    }


def padded_length(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def warmup_batches(batches: list[list[int]], lengths: list[int], count: int, multiple: int) -> list[int]:
    """Indices of measured batches to replay first: the longest (the allocator's high-water mark), the shortest,
    then one of each padded length residue mod 16 not yet covered, then the longest others; `count` in all."""
    if count <= 0 or not batches:
        return []
    longest = [padded_length(max(lengths[i] for i in batch), multiple) for batch in batches]
    order = sorted(range(len(batches)), key=lambda b: -longest[b])
    chosen = [order[0], order[-1]]
    residues = {longest[b] % SHAPE_RESIDUE for b in chosen}
    for b in order:
        if longest[b] % SHAPE_RESIDUE not in residues:
            chosen.append(b)
            residues.add(longest[b] % SHAPE_RESIDUE)
    chosen += [b for b in order if b not in chosen]
    picked = list(dict.fromkeys(chosen))[:count]
    return picked + [picked[i % len(picked)] for i in range(count - len(picked))]


def bench_order(lengths: list[int], batch_size: int, grouped: bool, seed: int) -> list[int]:
    """The row order of the measured steps: length-grouped as `toolkit sft` orders rows, or shuffled."""
    if grouped:
        return length_grouped_order(lengths, batch_size, 1, seed)
    order = list(range(len(lengths)))
    random.Random(seed).shuffle(order)
    return order


class StepClock(TrainerCallback):
    """The time of every optimizer step, from CUDA events recorded at each step's end (read once training is
    over, so measuring adds no synchronization), or from the host clock on CPU; and the weights' memory.

    It also counts, per step, what can stall the host while the GPU waits, so that a slow step can be explained:
    Python's garbage collection (seconds paused), and on a GPU the allocators' trips to the driver (new device
    segments, allocation retries after a failed cudaMalloc, new pinned host blocks)."""

    COUNTERS: ClassVar[dict[str, str]] = {"step_new_segments": "segment.all.allocated",
                                          "step_alloc_retries": "num_alloc_retries"}

    def __init__(self):
        self.marks: list = []
        self.weights_gib = None
        self.gc_s = 0.0
        self._gc_started = None
        self.counts: list[dict] = []

    def _gc(self, phase, info):
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            self.gc_s += time.perf_counter() - self._gc_started
            self._gc_started = None

    def _count(self) -> dict:
        import torch

        counts = {"step_gc_s": self.gc_s}
        if torch.cuda.is_available():
            device = torch.cuda.memory_stats()
            counts.update({key: device.get(name, 0) for key, name in self.COUNTERS.items()})
            counts["step_host_allocs"] = torch.cuda.host_memory_stats().get("num_host_alloc", 0)
        return counts

    @property
    def diagnostics(self) -> dict:
        """Per step (warm-up included): the increase of each counter over the step."""
        if len(self.counts) < 2:
            return {}
        return {key: [after[key] - before[key] for before, after in zip(self.counts, self.counts[1:])]
                for key in self.counts[0]}

    def on_train_end(self, args, state, control, **kwargs):
        if self._gc in gc.callbacks:
            gc.callbacks.remove(self._gc)

    def _mark(self):
        import torch

        if torch.cuda.is_available():
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        import torch

        if torch.cuda.is_available():
            self.weights_gib = torch.cuda.memory_allocated() / 2**30
        if self._gc not in gc.callbacks:
            gc.callbacks.append(self._gc)
        self.marks = [self._mark()]
        self.counts = [self._count()]

    def on_step_end(self, args, state, control, **kwargs):
        self.marks.append(self._mark())
        self.counts.append(self._count())

    @property
    def times(self) -> list[float]:
        import torch

        if self.marks and not isinstance(self.marks[0], float):
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


class TokenCounter:
    """Counts the real and padded tokens of each micro-batch the model is given, from a forward pre-hook on the
    model in the training process: image batches are built in DataLoader workers, where a wrapped collator's
    counts would stay. The sums stay on the device until training is over, so counting adds no synchronization."""

    def __init__(self, model):
        self.sums: list = []
        self.handle = model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        mask = kwargs.get("attention_mask")
        self.sums.append((mask.sum() if mask is not None else ids.numel(), ids.numel()))

    @property
    def records(self) -> list[tuple[int, int]]:
        self.handle.remove()
        return [(int(real), int(padded)) for real, padded in self.sums]


def synthetic_rows(lengths: list[int], token_limit: int, seed: int, prompt_share: float = 0.4) -> list[dict]:
    """Pre-tokenized rows of the given lengths; the first `prompt_share` of each is prompt (no loss)."""
    rng = random.Random(seed)
    rows = []
    for n in lengths:
        prompt = max(1, int(n * prompt_share))
        rows.append({
            "input_ids": [rng.randrange(token_limit) for _ in range(n)],
            "completion_mask": [0] * prompt + [1] * (n - prompt),
        })
    return rows


def parse_lengths(text: str) -> tuple[int, int]:
    low, sep, high = text.partition(":")
    if not sep or not low.isdigit() or not high.isdigit() or int(low) < 2 or int(high) < int(low):
        raise ToolkitError(f"--lengths expects MIN:MAX token counts, e.g. 70:370; got '{text}'")
    return int(low), int(high)


def sample_lengths(n: int, low: int, high: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(n)]


def full_size_config():
    from transformers import MllamaConfig

    values = json.loads(resources.files("toolkit").joinpath(FULL_SIZE_CONFIG).read_text("utf-8"))
    for key in ("architectures", "model_type", "torch_dtype"):
        values.pop(key, None)
    return MllamaConfig(**values)


def random_weights_checkpoint() -> Path:
    """Llama-3.2-11B-Vision's architecture with random bf16 weights, saved once to local disk so that it loads
    through the normal `from_pretrained` path (quantization included). Speed and memory don't depend on values."""
    import torch
    from transformers import AutoTokenizer, MllamaForConditionalGeneration

    target = builtin.cache_root() / RANDOM_WEIGHTS_NAME
    if (target / "config.json").exists():
        return target
    if not torch.cuda.is_available():
        raise ToolkitError("--random-weights builds the 11B architecture on the GPU; no CUDA GPU is visible")
    console.print("building the full-size architecture with random weights (about 21 GB on disk)...")
    # Any tokenizer with Llama 3's special tokens serves for synthetic rows: the built-in one, whose <|image|> the
    # config is told about (so `toolkit sft` accepts the pair); the image processor is Llama 3.2 Vision's
    # (560-pixel tiles, up to the config's tile count).
    tokenizer = AutoTokenizer.from_pretrained(builtin.ensure_builtin("builtin:tiny-mllama"))
    config = full_size_config()
    config.image_token_index = tokenizer.convert_tokens_to_ids(vision.IMAGE_TOKEN)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = MllamaForConditionalGeneration(config)
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(target)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    tokenizer.save_pretrained(target)
    full_size_processor(tokenizer).save_pretrained(target)
    return target


def full_size_processor(tokenizer):
    from transformers import MllamaProcessor

    tiles = full_size_config().vision_config
    image_processor = type(builtin.image_processor())(
        size={"height": tiles.image_size, "width": tiles.image_size}, max_image_tiles=tiles.max_num_tiles,
        image_mean=builtin.IMAGE_MEAN, image_std=builtin.IMAGE_STD)
    return MllamaProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=builtin.chat_template())


def tile_grid(tiles: int) -> tuple[int, int]:
    """(columns, rows) of the most square grid of `tiles` tiles."""
    rows = max(r for r in range(1, int(tiles**0.5) + 1) if tiles % r == 0)
    return tiles // rows, rows


def synthetic_image(folder: Path, tiles: int, tile_size: int) -> Path:
    """A noise image exactly `tiles` tiles in size (no resizing needed), for image-row timing."""
    import numpy as np
    from PIL import Image

    columns, rows = tile_grid(tiles)
    pixels = np.random.default_rng(0).integers(0, 256, (rows * tile_size, columns * tile_size, 3), dtype=np.uint8)
    path = folder / f"noise-{tiles}-tiles.png"
    Image.fromarray(pixels).save(path)
    return path


def with_images(rows: list[dict], image: Path, image_token_id: int) -> list[dict]:
    """Every row given the image, its `<|image|>` token just after the first token (in the prompt, as a user turn
    would put it)."""
    return [{**row, "input_ids": row["input_ids"][:1] + [image_token_id] + row["input_ids"][2:],
             "image_paths": [str(image)]} for row in rows]


BENCH_KEYS = {"pad_to": "pad every micro-batch to a multiple of this", "steps": "measured steps of this setup",
              "profile": "1: profile 2 steps after the measured ones",
              "image_tiles": "give every row one image that fills this many tiles (vision models)",
              "timeout": "stop this setup after this many seconds (--isolation process)"}


def split_bench_overrides(overrides: list[str]) -> tuple[list[str], dict]:
    """`bench.*` keys steer the benchmark itself (e.g. bench.pad_to=512); the rest are recipe overrides."""
    recipe_part, bench = [], {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key.startswith("bench."):
            name = key.removeprefix("bench.")
            if name not in BENCH_KEYS or not value.isdigit() or (name == "timeout" and int(value) == 0):
                raise ToolkitError(f"{item}: bench keys take a whole number: "
                                   + ", ".join(f"bench.{k} ({v})" for k, v in BENCH_KEYS.items()))
            bench[name] = int(value)
        else:
            recipe_part.append(item)
    return recipe_part, bench


def parse_setup(text: str) -> tuple[str, list[str]]:
    """`original`, or `LABEL: key=value key=value ...` (overrides applied to the benchmarked recipe). A named
    setup's label takes its overrides first (`original: bench.steps=5`); a label ending in `@before` takes
    BEFORE_FAST_PATHS first: the same setup as it ran before the fast paths."""
    label, sep, rest = text.partition(":")
    label = label.strip()
    if label in NAMED_SETUPS:
        return label, NAMED_SETUPS[label] + rest.split()
    if not sep:
        raise ToolkitError(f"--compare expects 'original' or 'LABEL: key=value ...', got '{text}'")
    extra = BEFORE_FAST_PATHS if label.endswith("@before") else []
    return label, extra + rest.split()


def with_auto_batch(recipe, config, low: int, high: int, precision: str):
    """`train.batch_size: auto` sized for rows up to `high` tokens, as `toolkit sft` sizes it for its rows."""
    sizing = sample_lengths(1000, low, high, seed=0) + [high]
    return memory.resolve_batch_size(recipe, config, sizing, precision)


def predicted_peak_gib(recipe, config, precision: str, longest: int, image_tiles: int = 0) -> float:
    """The memory model's peak for this setup's longest batch; with `image_tiles`, every row carries one image."""
    setup = memory.Setup.from_recipe(recipe, precision)
    text = config.get_text_config()
    weights = memory.weight_bytes(loading.meta_model(config), setup)
    per_row = longest * memory.activation_bytes_per_token(text, setup)
    if image_tiles:
        slots = vision.tile_slots(recipe.data.vision_tiles, config.vision_config.max_num_tiles, image_tiles)
        per_row += memory.image_row_bytes(config, setup, longest, 1, slots)
    return (weights + recipe.train.batch_size * per_row + memory.RESERVE_BYTES) / memory.GIB


def predicted_host_gib(recipe, config, precision: str, longest: int) -> float:
    setup = memory.Setup.from_recipe(recipe, precision)
    return memory.host_bytes(config.get_text_config(), setup, recipe.train.batch_size, longest) / memory.GIB


@dataclass
class Schedule:
    """The batches a setup trains, in order: warm-up replays, the measured batches, then any profiled ones."""

    lengths: list[int]  # row lengths in tokens; batches hold indices into it
    batches: list[list[int]]  # the measured micro-batches
    replay: list[int]  # indices of measured batches replayed as warm-up
    profiled: list[list[int]]
    multiple: int  # the collator pads each micro-batch to a multiple of this

    def padded(self, batch: list[int]) -> int:
        return padded_length(max(self.lengths[i] for i in batch), self.multiple)

    def row_lengths(self) -> list[int]:
        order = [self.batches[b] for b in self.replay] + self.batches + self.profiled
        return [self.lengths[i] for batch in order for i in batch]


def schedule(train, low: int, high: int, steps: int, warmup: int, profile_steps: int, multiple: int) -> Schedule:
    per_micro = train.batch_size
    lengths = sample_lengths(per_micro * train.grad_accum * steps, low, high, seed=0)
    order = bench_order(lengths, per_micro, train.group_by_length, train.seed)
    batches = [order[i : i + per_micro] for i in range(0, len(order), per_micro)]
    replay = warmup_batches(batches, lengths, warmup * train.grad_accum, multiple)
    profiled = [batches[i % len(batches)] for i in range(profile_steps * train.grad_accum)]
    return Schedule(lengths, batches, replay, profiled, multiple)


def memory_fields(device, clock: StepClock, recipe, config, precision: str, plan: Schedule,
                  image_tiles: int = 0) -> dict:
    import torch

    longest = max(plan.padded(batch) for batch in plan.batches)
    return {
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.cuda else None,
        "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if device.cuda else None,
        "weights_gib": clock.weights_gib,
        "predicted_peak_gib": predicted_peak_gib(recipe, config, precision, longest, image_tiles),
        "predicted_host_gib": predicted_host_gib(recipe, config, precision, longest),
        "longest_padded": longest,
    }


def measure(recipe, bench_opts: dict, low: int, high: int, steps: int, warmup: int, profile: bool = False,
            log_losses: bool = False) -> dict:
    """Train `warmup + steps` optimizer steps of this recipe on synthetic rows and measure the last `steps`."""
    import torch
    from datasets import Dataset

    device = loading.detect_accelerator()
    precision = resolve_precision(recipe.train.precision, device)
    check_kernels(recipe.train, device)
    config = loading.load_config(recipe.model.name, recipe.model.revision)
    tokenizer = loading.load_tokenizer(recipe.model.name, recipe.model.revision)
    recipe, _ = with_auto_batch(recipe, config, low, high, precision)
    steps = bench_opts.get("steps", steps)
    profile_steps = 2 if profile or bench_opts.get("profile") else 0
    multiple = bench_opts.get("pad_to") or pad_multiple(precision)
    plan = schedule(recipe.train, low, high, steps, warmup, profile_steps, multiple)
    rows = synthetic_rows(plan.row_lengths(), min(len(tokenizer), 4000), recipe.train.seed)
    train = recipe.train.model_copy(update={"max_steps": warmup + steps + profile_steps,
                                            "logging_steps": 1 if log_losses else 10**6})
    recipe = recipe.model_copy(update={"train": train})
    clock = StepClock()
    callbacks = [clock]
    profiler = None
    if profile_steps:
        from toolkit.bench.profiling import StepProfiler

        profiler = StepProfiler(skip=warmup + steps, steps=profile_steps)
        callbacks.append(profiler)
    overrides = {"save_strategy": "no", "train_sampling_strategy": "sequential", "num_train_epochs": 1}
    if bench_opts.get("pad_to"):
        overrides["pad_to_multiple_of"] = bench_opts["pad_to"]
    with tempfile.TemporaryDirectory(prefix="toolkit-bench-") as scratch:
        collator = None
        if bench_opts.get("image_tiles"):
            collator = vision.training_collator(recipe, config, tokenizer, precision)
            overrides["image_loader_workers"] = vision.loader_workers(recipe, collator.images)
            image = synthetic_image(Path(scratch), bench_opts["image_tiles"], collator.images.spec.tile_size)
            rows = with_images(rows, image, collator.images.image_token_id)
        built, _ = trainer.build_trainer(recipe, precision=precision, device=device, tokenizer=tokenizer,
                                         train_dataset=Dataset.from_list(rows), output_dir=scratch,
                                         callbacks=callbacks, data_collator=collator, **overrides)
        counter = TokenCounter(built.model)
        built.loss_record = []
        if device.cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.run_training(built, recipe, precision)
    text_config = config.get_text_config()
    checkpointed = memory.checkpointed_layers(text_config, memory.Setup.from_recipe(recipe, precision))
    flops = lora_flops_per_token(text_params_per_token(text_config), checkpointed / memory.text_layers(text_config))
    tokens = step_tokens(counter.records, train.grad_accum)[: warmup + steps]
    times = clock.times[: warmup + steps]
    result = summarize(times, tokens, warmup, flops, peak_flops(device.name))
    if bench_opts.get("image_tiles"):
        result["images_s"] = train.batch_size * train.grad_accum * steps / sum(times[warmup:])
        result["mfu"] = None  # the FLOP count covers text tokens only; image rows also run the vision tower
    result.update({
        "batch": train.batch_size, "checkpoint_layers": train.checkpoint_layers, "warmup_steps": warmup,
        "warmup_lengths": [plan.padded(plan.batches[b]) for b in plan.replay],
        "step_s": times[warmup:], "step_real_tokens": [real for real, _ in tokens[warmup:]],
        "warmup_step_s": times[:warmup],
        "step_lengths": [plan.padded(batch) for batch in plan.batches][: steps * train.grad_accum],
        **{key: values[: warmup + steps] for key, values in clock.diagnostics.items()},
        "micro_losses": [float(v) for v in torch.stack(built.loss_record).tolist()] if built.loss_record else [],
        **checkpointing_fields(built, warmup + steps + profile_steps),
        **memory_fields(device, clock, recipe, config, precision, plan, bench_opts.get("image_tiles") or 0),
        "fused_layers": getattr(built, "fused_counts", None),
        "attention": built.model.config.get_text_config()._attn_implementation,  # what `auto` chose
        "final_loss": next((e["loss"] for e in reversed(built.state.log_history) if "loss" in e), None),
        "device": device.name,
        "precision": precision,
    })
    if log_losses:
        result["losses"] = [e["loss"] for e in built.state.log_history if "loss" in e]
    if profiler is not None:
        result["profile"] = profiler.summary
    del built
    free_memory()
    return result


def checkpointing_fields(built, steps: int) -> dict:
    """What `toolkit.training.activations` did: checkpointed layers, and what went through host memory per step."""
    applied = built.checkpointing.applied if getattr(built, "checkpointing", None) else None
    if not applied:
        return {}
    fields = {"checkpointed_layers": applied["checkpointed"], "text_layers": applied["text_layers"]}
    hooks = applied["hooks"]
    if hooks is not None:
        fields.update({"offloaded_tensors_per_step": hooks.stats["tensors"] / steps,
                       "offloaded_gib_per_step": hooks.stats["bytes"] / steps / memory.GIB,
                       "prefetched_share": hooks.stats["prefetched"] / max(hooks.stats["fetched"], 1),
                       "host_peak_gib": hooks.stats["peak_host_bytes"] / memory.GIB,
                       "host_pinned_gib": hooks.buffer_stats()["peak_pinned_bytes"] / memory.GIB,
                       "host_buffer_allocations": hooks.buffer_stats()["allocations"]})
    return fields


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_safely(*args) -> dict:
    """`measure`, with a failure (e.g. running out of memory) returned as {'error': ...} instead of raised. The
    table shows the error's first line; its whole traceback goes to stderr, since some first lines (torch.compile's
    "AssertionError: from user code:") say nothing of the cause."""
    try:
        return measure(*args)
    except Exception as err:  # one setup failing must not lose the others' numbers
        import traceback

        print(f"setup failed: {type(err).__name__}", file=sys.stderr)
        traceback.print_exc(file=sys.stderr)
        free_memory()
        return {"error": f"{type(err).__name__}: {first_line(err)}"}


def child_main(queue, args) -> None:
    queue.put(measure_safely(*args))


def measure_isolated(*args, limit_s: float | None = None, limit_name: str = "--setup-timeout") -> dict:
    """`measure_safely` in a fresh Python process (spawned), so the setup starts from a clean slate. A process
    that dies without a result (killed for memory, a crash in a kernel) or runs past `limit_s` seconds is reported
    as the setup's error, and the next setup still runs."""
    import multiprocessing
    import queue as queues

    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    process = context.Process(target=child_main, args=(results, args))
    process.start()
    deadline = time.monotonic() + limit_s if limit_s else None
    result = None
    while result is None:
        try:
            result = results.get(timeout=2)
        except queues.Empty:
            if not process.is_alive():
                try:
                    result = results.get(timeout=2)
                except queues.Empty:
                    result = {"error": f"the setup's process exited with code {process.exitcode} and no result"}
            elif deadline is not None and time.monotonic() > deadline:
                process.terminate()
                result = {"error": f"stopped after {limit_s:.0f} s ({limit_name})"}
    process.join(30)
    if process.is_alive():
        process.kill()
        process.join()
    if process.exitcode not in (0, None) and "error" not in result:
        result["error"] = f"the setup's process exited with code {process.exitcode}"
    return result


def setup_recipe(base: dict, overrides: list[str], source: str):
    recipe_overrides, bench_opts = split_bench_overrides(overrides)
    data = apply_overrides(json.loads(json.dumps(base)), recipe_overrides)
    return recipe_from_dict(data, source), bench_opts


@dataclass(frozen=True)
class Setup:
    """One setup to measure: its label, the overrides it was given (its own, then the run's), its recipe, and its
    `bench.*` options."""

    label: str
    overrides: list[str]
    recipe: object
    bench_opts: dict


@dataclass(frozen=True)
class Bench:
    """A checked benchmark: every setup's recipe built before the first one runs, and how each is measured."""

    setups: list[Setup]
    lengths: str  # MIN:MAX as given
    low: int
    high: int
    steps: int
    warmup: int
    profile: bool = False
    losses: bool = False
    isolation: str = "process"
    setup_timeout: float | None = None
    time_limit: float | None = None
    started: float = 0.0  # time.monotonic() when the benchmark started: time_limit counts from here

    def document(self, results: list[dict]) -> dict:
        """bench.json's content for the results so far."""
        return {"lengths": self.lengths, "steps": self.steps, "warmup": self.warmup, "results": results}


def plan_bench(recipe_path: str, overrides=(), compare=(), *, no_recipe: bool = False, random_weights: bool = False,
               steps: int = 30, warmup: int = 5, lengths: str = "70:370", profile: bool = False, losses: bool = False,
               isolation: str = "process", setup_timeout: float | None = None,
               time_limit: float | None = None) -> Bench:
    """Every refusal `toolkit bench` makes, before any setup runs (a typo in the last setup must not cost the
    others' time): the counts, the recipe file, each `--compare` setup and its recipe, the lengths, the limits and
    what `--isolation none` cannot do. With `random_weights`, the full-size random checkpoint is built first."""
    if steps < 1 or warmup < 0:
        raise ToolkitError("--steps must be at least 1 and --warmup at least 0")
    if isolation not in ("process", "none"):
        raise ToolkitError(f"--isolation {isolation}: choose process or none")
    base = read_yaml(Path(recipe_path))
    if random_weights:
        base.setdefault("model", {})["name"] = str(random_weights_checkpoint())
    started = time.monotonic()
    setups = [parse_setup(text) for text in compare] + ([] if no_recipe else [("recipe", [])])
    if not setups:
        raise ToolkitError("--no-recipe leaves nothing to measure; add --compare setups")
    low, high = parse_lengths(lengths)
    for name, limit in (("setup-timeout", setup_timeout), ("time-limit", time_limit)):
        if limit is not None and limit <= 0:
            raise ToolkitError(f"--{name} takes a positive number of seconds")
    if setup_timeout is not None and isolation != "process":
        raise ToolkitError("--setup-timeout needs --isolation process (a setup in this process cannot be stopped)")
    planned = [Setup(label, own + list(overrides), *setup_recipe(base, own + list(overrides), recipe_path))
               for label, own in setups]
    if isolation != "process" and any("timeout" in setup.bench_opts for setup in planned):
        raise ToolkitError("bench.timeout needs --isolation process (a setup in this process cannot be stopped)")
    return Bench(planned, lengths, low, high, steps, warmup, profile, losses, isolation, setup_timeout, time_limit,
                 started)


def run_setup(bench: Bench, setup: Setup) -> dict:
    """Measure one setup (in its own process unless `isolation` is none) and return its row of bench.json: an
    `error` instead of numbers when it failed, ran past a limit, or was skipped because what `time_limit` leaves
    since the benchmark started is less than MIN_SETUP_S."""
    recipe, bench_opts = setup.recipe, setup.bench_opts
    result = {"setup": setup.label, "overrides": setup.overrides, "batch": recipe.train.batch_size,
              "grad_accum": recipe.train.grad_accum, "quantization": recipe.quantization.mode,
              "checkpointing": recipe.train.gradient_checkpointing,
              "checkpoint_layers": recipe.train.checkpoint_layers}
    args = (recipe, bench_opts, bench.low, bench.high, bench.steps, bench.warmup, bench.profile, bench.losses)
    left = None if bench.time_limit is None else bench.time_limit - (time.monotonic() - bench.started)
    if left is not None and left < MIN_SETUP_S:
        result["error"] = f"skipped: --time-limit {bench.time_limit:g} s reached"
    elif bench.isolation == "process":
        limits = {name: t for name, t in (("--setup-timeout", bench.setup_timeout),
                                          ("bench.timeout", bench_opts.get("timeout")), ("--time-limit", left))
                  if t is not None}
        name = min(limits, key=limits.get) if limits else "--setup-timeout"
        result.update(measure_isolated(*args, limit_s=limits.get(name), limit_name=name))
    else:
        result.update(measure_safely(*args))
    return result
