"""Photos are decoded at the size the image processor uses, and give the model the tiles the full-size photo gives."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from toolkit.config.recipe import load_recipe
from toolkit.data import photos, vision

# Llama 3.2 11B Vision's image processor: four tiles of 560 px, CLIP's mean and std.
MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
SPEC = vision.ImageSpec(tile_size=560, model_max_tiles=4, max_tiles=4, patches_per_tile=1601)


@pytest.fixture(scope="module")
def processor():
    module, _, _ = vision.mllama_helpers()
    return module.MllamaImageProcessorPil(size={"height": 560, "width": 560}, max_image_tiles=4,
                                          image_mean=MEAN, image_std=STD)


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """A photo-like image: smooth shapes, blotches and sensor noise (so every resampling filter has work to do)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    pixels = np.stack([128 + 100 * np.sin(x / 37 + y / 53), 128 + 90 * np.cos(y / 29 - x / 71),
                       128 + 60 * np.sin((x + y) / 113)], -1)
    blotches = rng.normal(0, 25, (height // 16 + 1, width // 16 + 1, 3)).astype(np.float32)
    pixels += np.kron(blotches, np.ones((16, 16, 1), np.float32))[:height, :width]
    pixels += rng.normal(0, 6, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def phone_jpeg(tmp_path_factory):
    path = tmp_path_factory.mktemp("photos") / "site.jpg"
    photo(2400, 1800).save(path, quality=90)
    return path


def features(image, processor):
    found, num_tiles = vision.image_features([[image]], processor, SPEC)
    return found, num_tiles


def resize_error(full: Image.Image) -> tuple[float, float]:
    """The processor's own resize error on this photo: its 8-bit bilinear resize against the exact area average
    of the same pixels, in the units of the pixel values the model gets (after normalising)."""
    _, _, height, width = photos.processed_shape(full.size, SPEC)
    exact = np.asarray(full.resize((width, height), Image.BOX), dtype=np.float64)
    bilinear = np.asarray(full.resize((width, height), Image.BILINEAR), dtype=np.float64)
    error = np.abs(exact - bilinear) / (np.array(STD) * 255)
    return float(error.max()), float(error.mean())


@pytest.mark.parametrize("kind", ["jpeg", "png"])
def test_a_photo_decoded_small_gives_the_tiles_of_the_full_photo(phone_jpeg, tmp_path, processor, kind):
    path = phone_jpeg
    if kind == "png":
        path = tmp_path / "site.png"
        Image.open(phone_jpeg).save(path)
    full = photos.open_photo(path)
    small = photos.open_photo(path, SPEC)
    assert full.size == (2400, 1800)
    # JPEG: libjpeg decodes at 1/2 (1200x900), the smallest scale no smaller than the processor's 1120x840;
    # PNG: decoded whole, then reduced by 2 with the box filter.
    assert small.size == (1200, 900) and small.mode == "RGB"
    with Image.open(path) as image:
        if kind == "jpeg":
            image.draft(None, (1120, 840))
        image.load()
        expected = image.convert("RGB")
    expected = expected if kind == "jpeg" else expected.reduce(2)
    assert np.array_equal(np.asarray(small), np.asarray(expected))  # how it was decoded, exactly
    (want, want_tiles), (got, got_tiles) = features(full, processor), features(small, processor)
    assert got_tiles == want_tiles == [[4]]
    assert got["aspect_ratio_ids"].tolist() == want["aspect_ratio_ids"].tolist()
    assert got["aspect_ratio_mask"].tolist() == want["aspect_ratio_mask"].tolist()
    assert got["pixel_values"].shape == want["pixel_values"].shape
    gap = (got["pixel_values"] - want["pixel_values"]).abs()
    worst, mean = resize_error(full)
    assert gap.max() <= worst and gap.mean() <= mean, (float(gap.max()), float(gap.mean()), worst, mean)
    assert gap.mean() > 0  # it really was decoded another way


def test_a_size_whose_reduction_would_change_the_tiles_is_kept_larger():
    """Near-square photos: under a 2-tile cap 1200x1199 fills two 560-px tiles, but its half (600x600) would fit
    one tile; so it is not reduced, and a reduction always keeps the full photo's layout."""
    spec = vision.ImageSpec(tile_size=560, model_max_tiles=4, max_tiles=2, patches_per_tile=1601)
    assert photos.processed_shape((1200, 1199), spec) == (560, 1120, 560, 560)
    assert photos.processed_shape(photos.reduced_size((1200, 1199), 2), spec) == (560, 560, 560, 560)
    assert photos.reduce_factor((1200, 1199), spec) == 1
    for size in [(2400, 2398), (5000, 4997), (4032, 3024), (3024, 4032)]:
        factor = photos.reduce_factor(size, spec)
        assert photos.processed_shape(photos.reduced_size(size, factor), spec) == photos.processed_shape(size, spec)
    assert photos.reduce_factor((8000, 6000), SPEC) == 7  # 1143x858: still no smaller than 1120x840


def test_a_144_megapixel_png_opens_without_pils_warning_and_a_bomb_is_still_refused(tmp_path):
    big = tmp_path / "big.png"
    Image.new("L", (12000, 12000), 128).save(big)  # 144 megapixels: PIL warns above 89
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        assert vision.image_problem(big) is None
        assert vision.image_size(big) == (12000, 12000)
        assert photos.open_photo(big, SPEC).size == (1200, 1200)  # reduced by 10 for 1120x1120
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 10000)).save(bomb)  # 200 megapixels in a few kilobytes: past PIL's refusal
    assert bomb.stat().st_size < 100_000
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert vision.image_problem(bomb) == f"image {bomb} has too many pixels to open safely"


def test_a_truncated_jpeg_still_fails_the_cheap_check(phone_jpeg, tmp_path):
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(phone_jpeg.read_bytes()[: phone_jpeg.stat().st_size // 2])
    assert vision.image_problem(phone_jpeg) is None
    assert vision.image_problem(cut).startswith(f"unreadable image {cut} (image file is truncated")


def test_image_workers_follow_the_cpu_count_or_the_recipe(tmp_path, monkeypatch):
    monkeypatch.setattr(photos.os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
    assert photos.loader_workers("auto", 1) == 8  # capped
    assert photos.loader_workers("auto", 2) == 7
    assert photos.loader_workers("auto", 8) == 1
    monkeypatch.setattr(photos.os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    assert photos.loader_workers("auto", 1) == 1
    assert photos.loader_workers(0) == 0 and photos.loader_workers(3) == 3
    # Each worker keeps two batches in /dev/shm: a container's default 64 MB holds no batch of 16 photos (241 MB).
    monkeypatch.setattr(photos.os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
    sixteen = photos.batch_bytes(SPEC, 16)
    assert sixteen == 16 * 4 * 3 * 560 * 560 * 4
    monkeypatch.setattr(photos, "shared_memory_free", lambda: 64 * 2**20)
    assert photos.loader_workers("auto", 1, sixteen) == 0 and photos.loader_workers(4, 1, sixteen) == 4
    recipe_16 = SimpleNamespace(train=SimpleNamespace(batch_size=16), data=SimpleNamespace(image_workers="auto"))
    assert vision.loader_workers(recipe_16, vision.ImageInputs(None, SPEC, 0)) == 0  # what training starts
    monkeypatch.setattr(photos, "shared_memory_free", lambda: 5 * sixteen)
    assert photos.loader_workers("auto", 1, sixteen) == 2
    monkeypatch.setattr(photos, "shared_memory_free", lambda: None)
    assert photos.loader_workers("auto", 1, sixteen) == 8
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: builtin:tiny-mllama}\ndata: {train: t.jsonl, image_workers: 3}\n")
    assert load_recipe(recipe).data.image_workers == 3
    recipe.write_text("model: {name: builtin:tiny-mllama}\ndata: {train: t.jsonl, image_workers: -1}\n")
    with pytest.raises(Exception, match="give a number of worker processes from 0 to 64, or auto"):
        load_recipe(recipe)


def test_image_batches_are_built_in_loader_workers_and_train_the_same_adapter(tmp_path, monkeypatch):
    """image_workers: 2 builds every image batch in DataLoader worker processes, and the adapter is the one the
    training process alone builds (image_workers: 0)."""
    import json
    import os

    from conftest import tiny_recipe, write_jsonl
    from safetensors.torch import load_file

    from toolkit import api

    (tmp_path / "pics").mkdir()
    rows = []
    for k, color in enumerate([(200, 40, 40), (40, 160, 40), (40, 40, 200), (90, 90, 90)]):
        photo(300 + 40 * k, 200, seed=k).save(tmp_path / "pics" / f"{k}.jpg")
        rows.append({"image": f"pics/{k}.jpg", "instruction": "무엇이 보입니까?", "output": f"사진 {k}"})
    train = write_jsonl(tmp_path / "photos.jsonl", rows)
    built_by = tmp_path / "built_by"
    built_by.mkdir()
    collate = vision.VisionCollator.__call__

    def recording(self, examples):
        (built_by / str(os.getpid())).touch()
        return collate(self, examples)

    monkeypatch.setattr(vision.VisionCollator, "__call__", recording)
    adapters = {}
    for workers in (0, 2):
        recipe = tiny_recipe(tmp_path, {"train": str(train)}, train={"max_steps": 2, "batch_size": 2, "save_steps": 2})
        run_dir = api.train(recipe, tmp_path / f"run{workers}", overrides=[f"data.image_workers={workers}"]).path
        pids = {int(p.name) for p in built_by.iterdir()}
        assert pids == ({os.getpid()} if workers == 0 else pids - {os.getpid()}) and len(pids) >= 1
        assert workers == 0 or os.getpid() not in pids
        for p in built_by.iterdir():
            p.unlink()
        adapters[workers] = load_file(str(run_dir / "adapter_model.safetensors"))
        assert json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["summary"]["steps"] == 2
    assert adapters[0].keys() == adapters[2].keys()
    assert all(torch_equal(adapters[0][k], adapters[2][k]) for k in adapters[0])
    assert any(adapters[0][k].abs().max() > 0 for k in adapters[0] if "cross_attn" in k and "lora_B" in k)


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_the_collator_reads_each_photo_at_the_processors_size(phone_jpeg, processor, monkeypatch):
    opened = []
    open_photo = photos.open_photo

    def recording(path, spec=None):
        image = open_photo(path, spec)
        opened.append(image.size)
        return image

    monkeypatch.setattr(photos, "open_photo", recording)
    collator = vision.VisionCollator(vision.ImageInputs(processor, SPEC, 128256), pad_token_id=0)
    batch = collator([{"input_ids": [128000, 128256, 5, 6], "completion_mask": [0, 0, 1, 1],
                       "image_paths": [str(phone_jpeg)]}])
    assert opened == [(1200, 900)]
    assert batch["pixel_values"].shape == (1, 1, 4, 3, 560, 560)


@pytest.mark.parametrize("turn", [6, 3, 8])
def test_a_phone_photo_is_read_upright_as_its_exif_orientation_says(tmp_path, processor, turn):
    """A phone held upright stores a 2400x1800 picture and EXIF orientation 6 (or 8); the model gets the portrait
    1800x2400 photo, at the processor's size, as transformers' load_image would show it."""
    from PIL import ImageOps

    path = tmp_path / "upright.jpg"
    exif = Image.Exif()
    exif[0x0112] = turn
    photo(2400, 1800, seed=3).save(path, quality=90, exif=exif)
    shown = (1800, 2400) if turn in (6, 8) else (2400, 1800)
    assert vision.image_size(path) == shown
    with Image.open(path) as image:
        reference = ImageOps.exif_transpose(image).convert("RGB")
    assert reference.size == shown
    full = photos.open_photo(path)
    assert full.size == shown and np.array_equal(np.asarray(full), np.asarray(reference))
    small = photos.open_photo(path, SPEC)
    assert small.size == ((900, 1200) if turn in (6, 8) else (1200, 900))
    (want, want_tiles), (got, got_tiles) = features(full, processor), features(small, processor)
    assert got_tiles == want_tiles and got["aspect_ratio_ids"].tolist() == want["aspect_ratio_ids"].tolist()
    gap = (got["pixel_values"] - want["pixel_values"]).abs()
    worst, mean = resize_error(full)
    assert gap.max() <= worst and gap.mean() <= mean
