"""Image rows for Llama 3.2 Vision (Mllama): checking image files, their cost, and the batches the model reads.

Why the toolkit builds image batches itself: TRL 1.16's vision collator does not work for Mllama. Given
prompt-completion rows it builds `cross_attention_mask` over the prompt only while `input_ids` span the whole row,
and the forward pass fails on the length mismatch; given `messages` rows it leaves `<|image|>` in the labels, which
on the real config (image token id 128256 = the text vocabulary size) is out of range for the loss. So rows are
encoded as text rows are (`toolkit.data.encode`: the template puts `<|image|>` first in the user turn and the loss mask
covers only assistant turns), and `VisionCollator` adds what Mllama needs beside the ids: pixel values, aspect-ratio
ids and masks from the model's own image processor, and the cross-attention mask from where the image tokens sit,
computed with transformers' Mllama helpers. A batch may mix image and text rows; a text row gets no image at all.

Images are opened only when their batch is built, so a data set of photos is never held in memory at once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from toolkit.config.precision import pad_multiple
from toolkit.data import photos
from toolkit.errors import first_line

IMAGE_TOKEN = "<|image|>"


def mllama_helpers():
    """transformers' Mllama image helpers (the PIL module where it exists, so no torchvision is needed)."""
    try:
        from transformers.models.mllama import image_processing_pil_mllama as module
    except ImportError:  # older transformers keep them in the main image processing module
        from transformers.models.mllama import image_processing_mllama as module
    from transformers.models.mllama.processing_mllama import (
        convert_sparse_cross_attention_mask_to_dense,
        get_cross_attention_token_mask,
    )

    return module, get_cross_attention_token_mask, convert_sparse_cross_attention_mask_to_dense


@dataclass(frozen=True)
class ImageSpec:
    """What the model's processor does with an image: tile size, the model's tile limit and this recipe's cap."""

    tile_size: int
    model_max_tiles: int
    max_tiles: int  # data.max_image_tiles, at most the model's
    patches_per_tile: int  # vision tokens per tile, the class token included

    @property
    def vision_tokens_per_image(self) -> int:
        """What the vision tower processes per image: transformers' Mllama pads every image to the model's tile
        count (padded tiles are masked, not skipped), so this does not shrink with fewer tiles."""
        return self.model_max_tiles * self.patches_per_tile


def image_spec(processor, model_config, cap: int | None) -> ImageSpec:
    vision = model_config.vision_config
    model_max = int(vision.max_num_tiles)
    size = processor.image_processor.size
    tile = int(size["height"] if isinstance(size, dict) else size.height)
    patches = (int(vision.image_size) // int(vision.patch_size)) ** 2 + 1
    return ImageSpec(tile, model_max, min(cap or model_max, model_max), patches)


def open_image(path: str | Path, spec: ImageSpec | None = None):
    """The image as RGB, decoded at the size the processor will use under `spec` (`toolkit.data.photos`)."""
    return photos.open_photo(path, spec)


def image_problem(path: Path) -> str | None:
    """Why `path` is not a usable image (None when it is)."""
    from PIL import Image, UnidentifiedImageError

    if not path.exists():
        return f"image not found: {path}"
    if not path.is_file():
        return f"not a file: {path}"
    try:
        photos.check_decodes(path)
    except UnidentifiedImageError:
        return f"not an image file PIL can read: {path}"
    except Image.DecompressionBombError:
        return f"image {path} has too many pixels to open safely"
    except (OSError, ValueError, SyntaxError) as err:  # truncated or corrupt data
        return f"unreadable image {path} ({first_line(err, 100)})"
    return None


def tiles_for(size: tuple[int, int], spec: ImageSpec) -> int:
    """How many tiles of content an image of (width, height) fills under the recipe's cap."""
    module, _, _ = mllama_helpers()
    width, height = size
    canvas_height, canvas_width = module.get_optimal_tiled_canvas(height, width, spec.max_tiles, spec.tile_size)
    return int(canvas_height // spec.tile_size) * int(canvas_width // spec.tile_size)


def image_size(path: str | Path) -> tuple[int, int]:
    return photos.shown_size(path)


@functools.cache
def model_aspect_ids(spec: ImageSpec):
    """Aspect-ratio ids of the recipe's capped table (index = capped id) renumbered to the model's own table: the
    ids index different tables, and the model's embeddings are laid out by its own."""
    import torch

    module, _, _ = mllama_helpers()
    capped = module.get_all_supported_aspect_ratios(spec.max_tiles)
    full = module.get_all_supported_aspect_ratios(spec.model_max_tiles)
    return torch.tensor([0] + [full.index(ratio) + 1 for ratio in capped])


def process_image(image, image_processor, spec: ImageSpec) -> tuple:
    """One image through the model's image processor: (its tiles of content, its aspect-ratio id in the model's
    table). One image per call, so either Mllama processor gives the same result whatever else is in the batch:
    the torchvision one groups a batch by image shape and fails on a batch whose first row has no image."""
    features = image_processor(images=[[image]], max_image_tiles=spec.max_tiles, return_tensors="pt")
    tiles = int(features["num_tiles"][0][0])
    aspect_id = int(model_aspect_ids(spec)[int(features["aspect_ratio_ids"][0, 0])])
    return features["pixel_values"][0, 0, :tiles], aspect_id


def tile_slots(tiling: str, model_max_tiles: int, largest_filled: int) -> int:
    """Tile slots an image runs as under `data.vision_tiles`: the model's count ("padded", what transformers and
    serving engines run), or the most tiles an image of the batch fills ("filled", see `toolkit.model.vision_tower`)."""
    return model_max_tiles if tiling == "padded" else max(largest_filled, 1)


def tiles_per_batch(num_tiles: list[list[int]], spec: ImageSpec, tiling: str) -> int:
    """Tile slots per image in a batch of images filling `num_tiles`."""
    return tile_slots(tiling, spec.model_max_tiles, max((n for row in num_tiles for n in row), default=1))


def image_features(image_lists: list[list], image_processor, spec: ImageSpec,
                   tiling: str = "padded") -> tuple[dict, list[list[int]]]:
    """Pixel values, aspect-ratio ids and masks for a batch (an empty list for a text row), and tiles per image.

    Each image is processed on its own and placed in the batch here, tiles of content first and zero tiles after,
    with the masks both Mllama processors build (tile 0 of every image slot is marked, as in Meta's reference code).
    """
    import torch

    processed = [[process_image(image, image_processor, spec) for image in images] for images in image_lists]
    num_tiles = [[len(tiles) for tiles, _ in row] for row in processed]
    slots = max((len(row) for row in processed), default=0)
    tile_slots = tiles_per_batch(num_tiles, spec, tiling)
    first = next(tiles for row in processed for tiles, _ in row)
    pixels = torch.zeros((len(processed), slots, tile_slots, *first.shape[1:]), dtype=first.dtype)
    aspect_ids = torch.zeros((len(processed), slots), dtype=torch.long)
    aspect_mask = torch.zeros((len(processed), slots, tile_slots), dtype=torch.long)
    aspect_mask[:, :, 0] = 1
    for i, row in enumerate(processed):
        for j, (tiles, aspect_id) in enumerate(row):
            pixels[i, j, : len(tiles)] = tiles
            aspect_ids[i, j] = aspect_id
            aspect_mask[i, j, : len(tiles)] = 1
    features = {"pixel_values": pixels, "aspect_ratio_ids": aspect_ids, "aspect_ratio_mask": aspect_mask}
    return features, num_tiles


def cross_attention_mask(input_ids, num_tiles: list[list[int]], image_token_id: int, tile_slots: int):
    """Which text positions read which image tiles: from each image token to the next (or to the end), as the
    Mllama processor computes it, over the padded ids so it matches their length exactly."""
    import torch

    _, token_mask, to_dense = mllama_helpers()
    sparse = [token_mask(row.tolist(), image_token_id) for row in input_ids]
    dense = to_dense(sparse, num_tiles=num_tiles, max_num_tiles=tile_slots, length=input_ids.shape[1])
    return torch.from_numpy(dense)


@dataclass(frozen=True)
class ImageInputs:
    """Everything needed to add image inputs to a batch of ids: the model's image processor, its tiling and the
    image token's id."""

    image_processor: object
    spec: ImageSpec
    image_token_id: int
    tiling: str = "padded"  # data.vision_tiles

    def add(self, batch: dict, image_paths: list[list[str]]) -> dict:
        """Add the image inputs to a padded batch; a batch without any image is left text-only."""
        if not any(image_paths):
            return batch
        images = [[open_image(path, self.spec) for path in paths] for paths in image_paths]
        features, num_tiles = image_features(images, self.image_processor, self.spec, self.tiling)
        batch.update(features)
        batch["cross_attention_mask"] = cross_attention_mask(batch["input_ids"], num_tiles, self.image_token_id,
                                                             features["pixel_values"].shape[2])
        return batch


def image_inputs_for(model_name: str, revision: str | None, model_config, tokenizer, cap: int | None,
                     tiling: str = "padded"):
    """ImageInputs for a vision model (None for a text-only model); `tiling` is `data.vision_tiles`."""
    from toolkit.model import loading

    if not loading.is_vision_config(model_config):
        return None
    processor = loading.load_processor(model_name, revision)
    if processor is None:
        return None
    return ImageInputs(processor.image_processor, image_spec(processor, model_config, cap),
                       tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tiling)


def learned_labels(example: dict, image_token_id: int) -> list[int]:
    """A row's labels: its ids where `completion_mask` is 1, -100 elsewhere and on every `<|image|>`, which is not a
    text token (its id on the real config is the vocabulary's size, out of range for the loss)."""
    ids, mask = example["input_ids"], example["completion_mask"]
    if len(ids) != len(mask):
        raise ValueError(f"a row's completion_mask has {len(mask)} entries for {len(ids)} input_ids")
    return [token if learned and token != image_token_id else -100 for token, learned in zip(ids, mask)]


class VisionCollator:
    """TRL's `DataCollatorForLanguageModeling` for the text (right-padded ids, attention mask, labels padded with
    -100, lengths rounded up to `pad_to_multiple_of`), given labels built from `completion_mask` here, and the image
    inputs of the rows that have images added after it.

    It wraps TRL's collator rather than subclassing it: the labels come from `completion_mask` when the batch is
    built (TRL's dataset preparation, which would build them, is skipped for image rows), and TRL refuses a
    `DataCollatorForLanguageModeling` over rows with a mask column and no `labels` for exactly that reason."""

    def __init__(self, images: ImageInputs, pad_token_id: int, pad_to_multiple_of: int | None = None):
        from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

        self.images = images
        self.text = DataCollatorForLanguageModeling(pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of)

    def __call__(self, examples: list[dict]) -> dict:
        image_token_id = self.images.image_token_id
        batch = self.text([{"input_ids": example["input_ids"], "labels": learned_labels(example, image_token_id)}
                           for example in examples])
        return self.images.add(batch, [list(example.get("image_paths") or []) for example in examples])


def training_collator(recipe, model_config, tokenizer, precision: str) -> VisionCollator:
    """The collator for a data set with image rows, padding to the multiple the precision asks for (what TRL is
    told for such a data set is `toolkit.config.translate.sft_kwargs`'s, given `loader_workers`)."""
    images = image_inputs_for(recipe.model.name, recipe.model.revision, model_config, tokenizer,
                              recipe.data.max_image_tiles, recipe.data.vision_tiles)
    multiple = pad_multiple(precision) if pad_multiple(precision) > 1 else None
    return VisionCollator(images, tokenizer.pad_token_id, multiple)


def loader_workers(recipe, images: ImageInputs) -> int:
    """DataLoader worker processes that build this recipe's image batches: `data.image_workers`, with `auto` sized
    by `toolkit.data.photos.loader_workers` for the pixels of a micro-batch of `train.batch_size` images."""
    rows = recipe.train.batch_size if isinstance(recipe.train.batch_size, int) else 1  # auto: a number by now
    return photos.loader_workers(recipe.data.image_workers, batch_size_bytes=photos.batch_bytes(images.spec, rows))
