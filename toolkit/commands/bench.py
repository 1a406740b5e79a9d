"""`toolkit bench RECIPE`: real training steps of a recipe's setup, measured.

Reports real (non-pad) tokens/s, padded tokens/s, median step time, MFU and peak GPU memory for the recipe and for
any `--compare` setups, in one process on the same rows, so results read as ratios. Training goes through the same
translators and SFTTrainer as `toolkit sft`; only the data is synthetic (token ids with a chosen length
distribution), because speed does not depend on which tokens they are.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import tempfile
import time
from importlib import resources
from pathlib import Path

from transformers import TrainerCallback

from toolkit import builtin, modeling, trainer
from toolkit.batching import length_grouped_order
from toolkit.errors import ToolkitError
from toolkit.prepare import check_kernels
from toolkit.recipe import apply_overrides, read_yaml, recipe_from_dict
from toolkit.report import console, show, write_json
from toolkit.translate import resolve_precision

FULL_SIZE_CONFIG = "assets/llama-3.2-11b-vision-instruct.config.json"
RANDOM_WEIGHTS_NAME = "random-llama-3.2-11b-vision"

# The original example: 8-bit, every row padded to 512, batch 2 x 2, gradient checkpointing, LoRA q,k,v,o in both
# towers. (It also says fp16, which crashes with current TRL; precision stays auto here.)
NAMED_SETUPS = {
    "original": [
        "quantization.mode=8bit",
        "train.batch_size=2",
        "train.grad_accum=2",
        "train.gradient_checkpointing=true",
        "train.group_by_length=false",
        "train.liger_kernel=false",
        "train.max_seq_length=512",
        "lora.scope=all",
        "lora.targets=[q_proj,k_proj,v_proj,o_proj]",
        "bench.pad_to=512",
    ]
}

# Dense bf16 tensor-core peak per GPU (vendor datasheets, FLOP/s), for MFU.
PEAK_BF16_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L40S": 362.05e12, "A10": 125e12}


# ---- arithmetic (pure, unit-tested on CPU) ----


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


def lora_flops_per_token(params: int, recompute: bool) -> float:
    """Forward 2P, backward 2P (input gradients only: frozen weights need no weight gradients), +2P to recompute
    activations under gradient checkpointing. LoRA's own matmuls and attention scores add well under 1% here."""
    return (6.0 if recompute else 4.0) * params


def peak_flops(device_name: str) -> float | None:
    for key, flops in PEAK_BF16_FLOPS.items():
        if key in device_name:
            return flops
    return None


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
    """Throughput over the measured (post-warm-up) steps: total tokens / total time; median step time."""
    times = step_times[warmup:]
    measured = tokens[warmup : warmup + len(times)]
    if not times or not measured:
        raise ToolkitError("no measured steps: raise --steps above --warmup")
    seconds = sum(times)
    real = sum(r for r, _ in measured)
    padded = sum(p for _, p in measured)
    real_rate = real / seconds
    return {
        "measured_steps": len(times),
        "median_step_s": statistics.median(times),
        "real_tok_s": real_rate,
        "padded_tok_s": padded / seconds,
        "pad_efficiency": real / padded if padded else None,
        "mfu": real_rate * flops_per_token / peak if peak else None,
    }


# ---- measurement ----


class StepClock(TrainerCallback):
    """Wall time of every optimizer step, synchronised with the GPU so queued kernels are counted."""

    def __init__(self):
        self.times: list[float] = []
        self._last = None

    def _now(self) -> float:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def on_train_begin(self, args, state, control, **kwargs):
        self._last = self._now()

    def on_step_end(self, args, state, control, **kwargs):
        now = self._now()
        self.times.append(now - self._last)
        self._last = now


class CountingCollator:
    """Wraps TRL's collator (unchanged) to count real and padded tokens of each micro-batch it builds."""

    def __init__(self, inner):
        self.inner = inner
        self.records: list[tuple[int, int]] = []

    def __call__(self, examples):
        batch = self.inner(examples)
        mask = batch.get("attention_mask")
        padded = batch["input_ids"].numel()
        self.records.append((int(mask.sum()) if mask is not None else padded, padded))
        return batch


def synthetic_rows(lengths: list[int], token_limit: int, seed: int, prompt_share: float = 0.4):
    """Pre-tokenized rows of the given lengths; the first `prompt_share` of each is prompt (no loss)."""
    from datasets import Dataset

    rng = random.Random(seed)
    rows = []
    for n in lengths:
        prompt = max(1, int(n * prompt_share))
        rows.append({
            "input_ids": [rng.randrange(token_limit) for _ in range(n)],
            "completion_mask": [0] * prompt + [1] * (n - prompt),
        })
    return Dataset.from_list(rows)


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
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = MllamaForConditionalGeneration(full_size_config())
    finally:
        torch.set_default_dtype(previous)
    model.save_pretrained(target)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    # Any tokenizer with Llama 3's special tokens serves for synthetic rows: the built-in one.
    AutoTokenizer.from_pretrained(builtin.ensure_builtin("builtin:tiny-mllama")).save_pretrained(target)
    return target


def split_bench_overrides(overrides: list[str]) -> tuple[list[str], dict]:
    """`bench.*` keys steer the benchmark itself (e.g. bench.pad_to=512); the rest are recipe overrides."""
    recipe_part, bench = [], {}
    for item in overrides:
        key, _, value = item.partition("=")
        if key.startswith("bench."):
            bench[key.removeprefix("bench.")] = int(value)
        else:
            recipe_part.append(item)
    return recipe_part, bench


def parse_setup(text: str) -> tuple[str, list[str]]:
    """`original`, or `LABEL: key=value key=value ...` (overrides applied to the benchmarked recipe)."""
    if text in NAMED_SETUPS:
        return text, NAMED_SETUPS[text]
    label, sep, rest = text.partition(":")
    if not sep:
        raise ToolkitError(f"--compare expects 'original' or 'LABEL: key=value ...', got '{text}'")
    return label.strip(), rest.split()


def measure(recipe, bench_opts: dict, lengths: list[int], steps: int, warmup: int) -> dict:
    """Train `warmup + steps` optimizer steps of this recipe on synthetic rows and measure them."""
    import torch

    device = modeling.detect_accelerator()
    precision = resolve_precision(recipe.train.precision, device)
    check_kernels(recipe.train, device)
    config = modeling.load_config(recipe.model.name, recipe.model.revision)
    tokenizer = modeling.load_tokenizer(recipe.model.name, recipe.model.revision)
    per_step = recipe.train.batch_size * recipe.train.grad_accum
    lengths = lengths[: per_step * (steps + warmup)]
    if recipe.train.group_by_length:
        lengths = [lengths[i] for i in length_grouped_order(lengths, recipe.train.batch_size, 1, recipe.train.seed)]
    rows = synthetic_rows(lengths, min(len(tokenizer), 4000), recipe.train.seed)
    train = recipe.train.model_copy(update={"max_steps": steps + warmup, "logging_steps": 10**6})
    recipe = recipe.model_copy(update={"train": train})
    clock = StepClock()
    overrides = {"save_strategy": "no"}
    if bench_opts.get("pad_to"):
        overrides["pad_to_multiple_of"] = bench_opts["pad_to"]
    with tempfile.TemporaryDirectory(prefix="toolkit-bench-") as scratch:
        built, _ = trainer.build_trainer(recipe, precision=precision, device=device, tokenizer=tokenizer,
                                         train_dataset=rows, output_dir=scratch, callbacks=[clock], **overrides)
        counter = CountingCollator(built.data_collator)
        built.data_collator = counter
        if device.cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.run_training(built, recipe, precision)
    text_config = config.get_text_config()
    flops = lora_flops_per_token(text_params_per_token(text_config), recipe.train.gradient_checkpointing)
    result = summarize(clock.times, step_tokens(counter.records, recipe.train.grad_accum), warmup, flops,
                       peak_flops(device.name))
    result["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if device.cuda else None
    result["reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30 if device.cuda else None
    result["final_loss"] = next((e["loss"] for e in reversed(built.state.log_history) if "loss" in e), None)
    result["device"] = device.name
    result["precision"] = precision
    del built
    free_memory()
    return result


def free_memory() -> None:
    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolkit bench", description="Measure training speed and memory.")
    parser.add_argument("recipe")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--random-weights", action="store_true",
                        help="use the full-size Llama-3.2-11B-Vision architecture with random weights (no download)")
    parser.add_argument("--steps", type=int, default=10, help="measured optimizer steps")
    parser.add_argument("--warmup", type=int, default=3, help="optimizer steps run first and not measured")
    parser.add_argument("--lengths", default="70:370", help="row lengths in tokens, MIN:MAX uniform")
    parser.add_argument("--compare", action="append", default=[], metavar="SETUP",
                        help="also measure 'original' or 'LABEL: key=value ...' (repeatable); measured first")
    parser.add_argument("--json", help="write results here (default: bench.json in the current directory)")
    return parser


def setup_recipe(base: dict, overrides: list[str], source: str):
    recipe_overrides, bench_opts = split_bench_overrides(overrides)
    data = apply_overrides(json.loads(json.dumps(base)), recipe_overrides)
    return recipe_from_dict(data, source), bench_opts


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    base = read_yaml(Path(args.recipe))
    if args.random_weights:
        base.setdefault("model", {})["name"] = str(random_weights_checkpoint())
    setups = [parse_setup(text) for text in args.compare] + [("recipe", [])]
    low, high = parse_lengths(args.lengths)
    results = []
    for label, overrides in setups:
        recipe, bench_opts = setup_recipe(base, overrides + args.overrides, args.recipe)
        per_step = recipe.train.batch_size * recipe.train.grad_accum
        lengths = sample_lengths(per_step * (args.steps + args.warmup), low, high, seed=0)
        console.print(f"[bold]{label}[/]: {' '.join(overrides + args.overrides) or 'as the recipe says'}")
        result = {"setup": label, "overrides": overrides + args.overrides, "batch": recipe.train.batch_size,
                  "grad_accum": recipe.train.grad_accum, "quantization": recipe.quantization.mode}
        try:
            result.update(measure(recipe, bench_opts, lengths, args.steps, args.warmup))
        except Exception as err:  # one setup running out of memory must not lose the others' numbers
            result["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
            free_memory()
        results.append(result)
        show_results(results)
        write_json(Path(args.json or "bench.json"), {"lengths": args.lengths, "steps": args.steps,
                                                     "warmup": args.warmup, "results": results})
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
        [r["setup"], r["quantization"], f"{r['batch']}x{r['grad_accum']}", round(r["real_tok_s"]),
         round(r["padded_tok_s"]), f"{r['pad_efficiency']:.0%}", f"{r['median_step_s']:.3f}",
         f"{r['mfu']:.1%}" if r["mfu"] else "n/a", f"{r['peak_gib']:.1f}" if r["peak_gib"] else "n/a",
         f"{r['real_tok_s'] / base:.2f}x"]
        for r in done
    ]
    show("Training speed (measured steps after warm-up)",
         ["setup", "quant", "batch", "real tok/s", "padded tok/s", "real/padded", "step s", "MFU", "peak GiB",
          "vs first"], rows)
