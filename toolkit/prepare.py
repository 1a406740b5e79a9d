"""Everything that can be checked before a model's weights load: recipe, data, encoding, lengths, LoRA targets.

`toolkit validate` runs exactly this; `toolkit sft` runs it first, so a bad recipe or file fails in seconds and
leaves no run directory behind. The rows are encoded here once (`toolkit.encode`), and training uses these very
ids and masks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rich.markup import escape

from toolkit import data, lora, modeling, replay, sampling, trackers, vision
from toolkit.errors import ToolkitError
from toolkit.report import console, show
from toolkit.translate import Accelerator, resolve_precision


@dataclass
class Prepared:
    recipe: object
    device: Accelerator
    precision: str
    tokenizer: object
    model_config: object
    train: data.Encoding
    eval: data.Encoding
    lora_modules: list[str] = field(default_factory=list)
    image_spec: vision.ImageSpec | None = None
    image_tiles: dict[str, int] = field(default_factory=dict)  # tiles of content per image path
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
        return [len(e.input_ids) for e in self.train.examples]


def check_kernels(train, device: Accelerator) -> None:
    if not train.liger_kernel:
        return
    if not device.cuda:
        raise ToolkitError("train.liger_kernel=true needs a CUDA GPU; set it to false on CPU")
    from importlib.util import find_spec

    if find_spec("liger_kernel") is None:
        raise ToolkitError("train.liger_kernel=true needs liger-kernel: pip install 'toolkit[gpu]'")


def check_rows_left(encoding: data.Encoding, limit: int, key: str) -> None:
    if not encoding.rows and encoding.dropped:
        raise ToolkitError(f"{key}: all {encoding.dropped} rows were dropped by train.max_seq_length={limit} "
                           f"(data.too_long); raise the limit or shorten the rows")


def prepare(recipe, device: Accelerator | None = None) -> Prepared:
    device = device or modeling.detect_accelerator()
    precision = resolve_precision(recipe.train.precision, device)
    check_kernels(recipe.train, device)
    trackers.check_installed(recipe.train.report_to)
    train_rows, eval_rows = data.load_splits(recipe.data, recipe.train.seed)
    model_config = modeling.load_config(recipe.model.name, recipe.model.revision)
    tokenizer = modeling.load_tokenizer(recipe.model.name, recipe.model.revision)
    limit = recipe.train.max_seq_length
    train = data.encode_rows(train_rows, recipe.data, tokenizer, limit)
    check_rows_left(train, limit, "data.train")
    train, mixed = replay.mix(train, recipe.data, tokenizer, limit, recipe.train.seed)
    evals = data.encode_rows(eval_rows, recipe.data, tokenizer, limit)
    sampling.check_recipe(recipe, evals.rows)
    prepared = Prepared(recipe, device, precision, tokenizer, model_config, train, evals, replay=mixed)
    if train.image_rows or evals.image_rows:
        measure_images(prepared)
    meta = modeling.meta_model(model_config)
    modeling.check_skip_modules(recipe.quantization, meta)  # before LoRA renames the wrapped layers
    prepared.lora_modules = lora.resolve_targets(meta, recipe.lora)
    return prepared


def measure_images(prepared: Prepared) -> None:
    """Check the model can read images, and how many tiles each image fills under the recipe's cap."""
    recipe = prepared.recipe
    if not modeling.is_vision_config(prepared.model_config):
        raise ToolkitError(f"{prepared.train.image_rows + prepared.eval.image_rows} rows have images, but "
                           f"{recipe.model.name} is not a vision model; use Llama 3.2 Vision or drop the images")
    processor = modeling.load_processor(recipe.model.name, recipe.model.revision)
    if processor is None:
        raise ToolkitError(f"{recipe.model.name} has no image processor (processor_config.json); the checkpoint "
                           "folder is incomplete")
    check_image_token(prepared.tokenizer, prepared.model_config, recipe.model.name)
    prepared.image_spec = vision.image_spec(processor, prepared.model_config, recipe.data.max_image_tiles)
    paths = {path for e in prepared.train.examples + prepared.eval.examples for path in e.images}
    prepared.image_tiles = {p: vision.tiles_for(vision.image_size(p), prepared.image_spec) for p in sorted(paths)}


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
    images = sum(len(e.images) for e in p.train.examples)
    tiles = data.percentiles(list(p.image_tiles.values()))
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


def length_note(encoding: data.Encoding, limit: int) -> str:
    over = sum(n > limit for n in encoding.lengths)
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
    stats = data.percentiles(p.train.lengths)
    rows = [
        ["model", r.model.name],
        ["device", f"{p.device.name} ({p.precision})"],
        ["quantization", r.quantization.mode],
        ["LoRA", f"r={r.lora.r} alpha={r.lora.alpha:g} dropout={r.lora.dropout:g} scope={r.lora.scope}"],
        ["LoRA modules", str(len(p.lora_modules))],
        ["train rows", f"{len(p.train.rows)} of {len(p.train.lengths)}"],
        ["eval rows", f"{len(p.eval.rows)} of {len(p.eval.lengths)}"],
        ["tokens/row p50 p90 p99 max", " ".join(str(v) for v in stats.values())],
        ["train rows too long", length_note(p.train, limit)],
        ["batch", f"{r.train.batch_size} x {r.train.grad_accum} accumulation"],
        ["output", r.output_dir],
    ]
    if p.eval.lengths:
        rows.insert(9, ["eval rows too long", length_note(p.eval, limit)])
    if p.image_spec:
        rows.insert(8, ["images", image_note(p)])
    if p.replay:
        rows.insert(6, ["replay", f"{p.replay.rows} general rows ({p.replay.distinct} different) from "
                                  f"{p.replay.source}: {p.replay.rows / len(p.train.rows):.0%} of train rows"])
    show("Plan", ["setting", "value"], rows)
    special = p.train.special_text + p.eval.special_text
    if special:
        console.print(f"[yellow]note:[/] {len(special)} row(s) contain special-token text such as <|eot_id|> "
                      f"(first: {escape(special[0])}); it is trained as plain text, never as the token itself",
                      soft_wrap=True)
