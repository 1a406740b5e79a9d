"""Everything that can be checked before a model's weights load: recipe, data, lengths, LoRA targets.

`toolkit validate` runs exactly this; `toolkit sft` runs it first, so a bad recipe or file fails in seconds and
leaves no run directory behind.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from toolkit import data, modeling
from toolkit.errors import ToolkitError
from toolkit.report import show
from toolkit.translate import Accelerator, resolve_precision, to_lora_config


@dataclass
class Prepared:
    recipe: object
    device: Accelerator
    precision: str
    tokenizer: object
    model_config: object
    lora_config: object
    train_rows: list
    eval_rows: list
    lengths: list[int]
    too_long: int
    dropped: int = 0
    lora_modules: list[str] = field(default_factory=list)


def drop_too_long(rows: list, lengths: list[int], limit: int) -> tuple[list, list[int]]:
    kept = [(r, n) for r, n in zip(rows, lengths) if n <= limit]
    return [r for r, _ in kept], [n for _, n in kept]


def check_kernels(train, device: Accelerator) -> None:
    if not train.liger_kernel:
        return
    if not device.cuda:
        raise ToolkitError("train.liger_kernel=true needs a CUDA GPU; set it to false on CPU")
    from importlib.util import find_spec

    if find_spec("liger_kernel") is None:
        raise ToolkitError("train.liger_kernel=true needs liger-kernel: pip install 'toolkit[gpu]'")


def prepare(recipe, device: Accelerator | None = None, check_modules: bool = True) -> Prepared:
    device = device or modeling.detect_accelerator()
    precision = resolve_precision(recipe.train.precision, device)
    check_kernels(recipe.train, device)
    train_rows, eval_rows = data.load_splits(recipe.data, recipe.train.seed)
    model_config = modeling.load_config(recipe.model.name, recipe.model.revision)
    tokenizer = modeling.load_tokenizer(recipe.model.name, recipe.model.revision)
    limit = recipe.train.max_seq_length
    lengths = data.token_lengths(train_rows, recipe.data, tokenizer)
    eval_lengths = data.token_lengths(eval_rows, recipe.data, tokenizer)
    too_long = sum(n > limit for n in lengths + eval_lengths)
    dropped = 0
    if recipe.data.too_long == "drop" and too_long:
        before = len(train_rows) + len(eval_rows)
        train_rows, lengths = drop_too_long(train_rows, lengths, limit)
        eval_rows, _ = drop_too_long(eval_rows, eval_lengths, limit)
        dropped = before - len(train_rows) - len(eval_rows)
        if not train_rows:
            raise ToolkitError(f"every training row is longer than train.max_seq_length={limit}; raise it")
    lora_config = to_lora_config(recipe.lora)
    prepared = Prepared(
        recipe, device, precision, tokenizer, model_config, lora_config, train_rows, eval_rows, lengths, too_long, dropped
    )
    if check_modules:
        prepared.lora_modules = modeling.check_lora_targets(
            modeling.meta_model(model_config), recipe.lora, lora_config
        )
    return prepared


def show_plan(p: Prepared) -> None:
    r = p.recipe
    stats = data.percentiles(p.lengths)
    limit = r.train.max_seq_length
    long_note = f"{p.too_long} over {limit}" + (f", dropped {p.dropped}" if p.dropped else (", truncated" if p.too_long else ""))
    rows = [
        ["model", r.model.name],
        ["device", f"{p.device.name} ({p.precision})"],
        ["quantization", r.quantization.mode],
        ["LoRA", f"r={r.lora.r} alpha={r.lora.alpha:g} dropout={r.lora.dropout:g} scope={r.lora.scope}"],
        ["LoRA modules", str(len(p.lora_modules)) if p.lora_modules else "checked at load"],
        ["train rows", len(p.train_rows)],
        ["eval rows", len(p.eval_rows)],
        ["tokens/row p50 p90 p99 max", " ".join(str(v) for v in stats.values())],
        ["rows too long", long_note],
        ["batch", f"{r.train.batch_size} x {r.train.grad_accum} accumulation"],
        ["output", r.output_dir],
    ]
    show("Plan", ["setting", "value"], rows)

