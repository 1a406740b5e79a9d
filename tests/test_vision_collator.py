"""The image collator gives the tensors it gave before its text half became TRL's `DataCollatorForLanguageModeling`.

`Reference` is the collator as it was written by hand (ids, attention mask and labels padded in a loop), kept here
verbatim as the yardstick: every batch shape (text first, image first, all text, all image, several images in a
row), with and without padding to a multiple, must come out tensor for tensor the same.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil

from toolkit.data import vision

SPEC = vision.ImageSpec(tile_size=56, model_max_tiles=4, max_tiles=4, patches_per_tile=17)
IMAGE = 128256  # the real config's image token id: the text vocabulary's size, out of range for the loss
PAD = 128004
BOS = 128000


class Reference:
    """The hand-written collator this file compares against (its `__call__`, unchanged)."""

    def __init__(self, images: vision.ImageInputs, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.images = images
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def padded_length(self, examples) -> int:
        longest = max(len(e["input_ids"]) for e in examples)
        step = self.pad_to_multiple_of or 1
        return -(-longest // step) * step

    def __call__(self, examples: list[dict]) -> dict:
        length = self.padded_length(examples)
        image_token_id = self.images.image_token_id
        ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(examples), length), dtype=torch.long)
        labels = torch.full((len(examples), length), -100, dtype=torch.long)
        for i, example in enumerate(examples):
            row = torch.tensor(example["input_ids"], dtype=torch.long)
            learned = torch.tensor(example["completion_mask"], dtype=torch.bool) & (row != image_token_id)
            ids[i, : len(row)] = row
            attention[i, : len(row)] = 1
            labels[i, : len(row)] = torch.where(learned, row, torch.full_like(row, -100))
        batch = {"input_ids": ids, "attention_mask": attention, "labels": labels}
        return self.images.add(batch, [list(example.get("image_paths") or []) for example in examples])


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("collator-pictures")
    sizes = {"wide": (110, 50), "square": (40, 40), "tall": (50, 160)}  # 2, 1 and 3 tiles of 56 px
    paths = {}
    for k, (name, size) in enumerate(sizes.items()):
        Image.new("RGB", size, (200 - 60 * k, 40 + 60 * k, 90)).save(folder / f"{name}.png")
        paths[name] = str(folder / f"{name}.png")
    return paths


def example(images: list[str], prompt: int, answer: int, seed: int) -> dict:
    """A row as `toolkit.data.encode` leaves it: begin-of-text, one image token per image, the prompt (masked), the
    answer (learned); `image_paths` only on a row with images, as in the data sets the toolkit builds."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(10, 1000, (prompt + answer,), generator=g).tolist()
    ids = [BOS] + [IMAGE] * len(images) + words
    mask = [0] * (1 + len(images) + prompt) + [1] * answer
    row = {"input_ids": ids, "completion_mask": mask}
    if images:
        row["image_paths"] = list(images)
    return row


SHAPES = {  # (images, prompt tokens, answer tokens) per row
    "text first": [([], 9, 4), (["wide"], 5, 7), (["square"], 3, 2)],
    "image first": [(["square"], 4, 3), ([], 12, 6), (["tall"], 2, 5)],
    "all text": [([], 5, 3), ([], 11, 8), ([], 2, 1)],
    "all image": [(["tall"], 6, 2), (["wide"], 3, 9), (["square"], 7, 7)],
    "several per row": [([], 4, 4), (["square", "tall"], 6, 3), (["wide"], 2, 2)],
    "one row": [(["wide", "square"], 8, 16)],  # 27 tokens: padded to 32 by a multiple of 8
}


def batch_of(shape: str, pictures: dict) -> list[dict]:
    return [example([pictures[name] for name in names], prompt, answer, seed)
            for seed, (names, prompt, answer) in enumerate(SHAPES[shape])]


def inputs(tiling: str = "padded") -> vision.ImageInputs:
    processor = MllamaImageProcessorPil(size={"height": 56, "width": 56}, max_image_tiles=4)
    return vision.ImageInputs(processor, SPEC, IMAGE, tiling)


def assert_same_tensors(found: dict, expected: dict) -> None:
    assert sorted(found) == sorted(expected)
    for key in expected:
        assert found[key].dtype == expected[key].dtype, key
        assert found[key].shape == expected[key].shape, key
        assert torch.equal(found[key], expected[key]), key


@pytest.mark.parametrize("multiple", [None, 8])
@pytest.mark.parametrize("shape", SHAPES)
def test_every_batch_shape_gives_the_hand_written_collators_tensors(shape, multiple, pictures):
    images = inputs()
    examples = batch_of(shape, pictures)
    found = vision.VisionCollator(images, PAD, multiple)(examples)
    assert_same_tensors(found, Reference(images, PAD, multiple)(examples))
    longest = max(len(e["input_ids"]) for e in examples)
    assert found["input_ids"].shape[1] == (longest if multiple is None else -(-longest // 8) * 8)
    assert ("pixel_values" in found) == (shape != "all text")


def test_filled_tiling_gives_the_hand_written_collators_tensors(pictures):
    images = inputs("filled")
    examples = batch_of("several per row", pictures)
    found = vision.VisionCollator(images, PAD, 8)(examples)
    assert_same_tensors(found, Reference(images, PAD, 8)(examples))
    assert found["pixel_values"].shape[2] == 3  # the tall picture's tiles, not the model's 4


def test_labels_are_the_answer_alone_and_padding_is_ignored(pictures):
    """Pinned values, beside the comparison: a text row and an image row of known ids, padded to 8."""
    rows = [{"input_ids": [BOS, 11, 12, 13, 14], "completion_mask": [0, 0, 0, 1, 1]},
            {"input_ids": [BOS, IMAGE, 21, 22], "completion_mask": [0, 0, 0, 1], "image_paths": [pictures["square"]]}]
    batch = vision.VisionCollator(inputs(), PAD, 8)(rows)
    assert batch["input_ids"].tolist() == [[BOS, 11, 12, 13, 14, PAD, PAD, PAD], [BOS, IMAGE, 21, 22] + [PAD] * 4]
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1] * 4 + [0] * 4]
    assert batch["labels"].tolist() == [[-100, -100, -100, 13, 14, -100, -100, -100], [-100] * 3 + [22] + [-100] * 4]
    assert batch["cross_attention_mask"][1, :, 0].sum(dim=-1).tolist() == [0, 1, 1, 1, 1, 1, 1, 1]
    assert batch["cross_attention_mask"][0].abs().sum() == 0  # the text row reads no image


def test_an_image_token_is_never_a_label_even_inside_the_answer(pictures):
    """A completion mask that covers `<|image|>` (id 128256, one past the text vocabulary) still leaves it out."""
    rows = [{"input_ids": [BOS, 31, IMAGE, 32], "completion_mask": [0, 1, 1, 1], "image_paths": [pictures["wide"]]}]
    batch = vision.VisionCollator(inputs(), PAD)(rows)
    assert batch["labels"].tolist() == [[-100, 31, -100, 32]]
    assert_same_tensors(batch, Reference(inputs(), PAD)(rows))


def test_a_row_whose_mask_and_ids_differ_in_length_is_refused(pictures):
    rows = [{"input_ids": [BOS, 11, 12], "completion_mask": [0, 1]}]
    with pytest.raises(ValueError, match="completion_mask has 2 entries for 3 input_ids"):
        vision.VisionCollator(inputs(), PAD)(rows)
