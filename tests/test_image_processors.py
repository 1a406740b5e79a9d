"""Image batches come out the same whichever Mllama image processor transformers picks.

Without torchvision (these CPU machines) transformers uses the PIL processor; with torchvision (GPU hosts) it uses
the torchvision one, whose batch padding reads `batch_images[0][0]` and so fails on a batch whose first row has no
image. `TorchvisionLike` behaves as that processor does on such a batch; where torchvision is installed the real
one is tested too.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers.models.mllama.image_processing_pil_mllama import (
    MllamaImageProcessorPil,
)

from toolkit.data import vision

SPEC = vision.ImageSpec(tile_size=56, model_max_tiles=4, max_tiles=4, patches_per_tile=17)
WIDE = Image.new("RGB", (110, 50), (200, 30, 30))  # 2 tiles side by side
SQUARE = Image.new("RGB", (40, 40), (30, 200, 30))  # 1 tile
TALL = Image.new("RGB", (50, 160), (30, 30, 200))  # 3 tiles stacked

BATCHES = {  # each row's images; [] is a text row
    "text first": [[], [WIDE], [SQUARE]],
    "image first": [[SQUARE], [], [TALL]],
    "all image": [[TALL], [WIDE], [SQUARE]],
    "several per row": [[], [SQUARE, TALL], [WIDE]],
    "one image, then text": [[WIDE], [], []],
}


def pil_processor():
    return MllamaImageProcessorPil(size={"height": 56, "width": 56}, max_image_tiles=4)


class TorchvisionLike:
    """The PIL processor, failing as transformers' torchvision Mllama processor does when the first row of a batch
    has no image (its `pad_batches_and_tiles` reads `batch_images[0][0]`)."""

    def __init__(self):
        self.inner = pil_processor()

    def __call__(self, images, **kwargs):
        if not images[0]:
            raise IndexError("list index out of range")
        return self.inner(images=images, **kwargs)


def torchvision_processor():
    pytest.importorskip("torchvision")
    from transformers.models.mllama.image_processing_mllama import MllamaImageProcessor

    return MllamaImageProcessor(size={"height": 56, "width": 56}, max_image_tiles=4)


PROCESSORS = {"pil": pil_processor, "torchvision-like": TorchvisionLike, "torchvision": torchvision_processor}


def reference(rows):
    """What the PIL processor makes of the whole batch at once (it accepts any batch with an image)."""
    features = pil_processor()(images=rows, max_image_tiles=4, return_tensors="pt")
    return features, features["num_tiles"]


@pytest.mark.parametrize("kind", PROCESSORS)
@pytest.mark.parametrize("shape", BATCHES)
def test_every_batch_shape_gives_the_pil_processors_tensors(kind, shape):
    rows = BATCHES[shape]
    features, num_tiles = vision.image_features(rows, PROCESSORS[kind](), SPEC)
    expected, expected_tiles = reference(rows)
    assert num_tiles == expected_tiles
    assert torch.equal(features["aspect_ratio_ids"], expected["aspect_ratio_ids"])
    assert torch.equal(features["aspect_ratio_mask"], expected["aspect_ratio_mask"])
    tolerance = 0 if kind != "torchvision" else 0.05  # the two resize implementations differ by a few 1/255
    assert features["pixel_values"].shape == expected["pixel_values"].shape
    assert torch.allclose(features["pixel_values"], expected["pixel_values"], atol=tolerance, rtol=0)


def test_the_torchvision_like_processor_fails_on_a_text_first_batch():
    """The stand-in reproduces the failure, so the test above would catch a return to whole-batch processing."""
    with pytest.raises(IndexError):
        TorchvisionLike()(images=BATCHES["text first"], max_image_tiles=4, return_tensors="pt")


def test_a_rows_tensors_do_not_depend_on_the_rest_of_its_batch():
    alone, _ = vision.image_features([[TALL]], TorchvisionLike(), SPEC)
    mixed, _ = vision.image_features([[], [SQUARE], [TALL]], TorchvisionLike(), SPEC)
    assert torch.equal(mixed["pixel_values"][2], alone["pixel_values"][0])
    assert mixed["aspect_ratio_ids"][2].tolist() == alone["aspect_ratio_ids"][0].tolist() == [7]  # (3, 1) in the 4-tile table
    assert mixed["pixel_values"][0].abs().sum() == 0 and mixed["aspect_ratio_ids"][0].tolist() == [0]


def test_filled_tiling_keeps_the_batchs_largest_tile_count():
    features, num_tiles = vision.image_features([[], [SQUARE], [WIDE]], pil_processor(), SPEC, tiling="filled")
    assert num_tiles == [[], [1], [2]]
    assert features["pixel_values"].shape == (3, 1, 2, 3, 56, 56)
    assert features["aspect_ratio_mask"].tolist() == [[[1, 0]], [[1, 0]], [[1, 1]]]
    padded, _ = vision.image_features([[], [SQUARE], [WIDE]], pil_processor(), SPEC)
    assert torch.equal(features["pixel_values"], padded["pixel_values"][:, :, :2])
    assert torch.equal(features["aspect_ratio_ids"], padded["aspect_ratio_ids"])
