"""How fast phone photos become the image inputs Llama 3.2 Vision trains on, before and after decoding at size.

    python scripts/photo_pipeline.py [--images 16] [--size 8000x6000] [--folder DIR]

Self-contained: writes its own phone-sized JPEGs (photo-like content, quality 90) into a temporary folder (or
--folder, reused when the files are there), then measures, with the 11B model's own image processor settings
(transformers' PIL Mllama processor: four tiles of 560 px):

- a batch of --images photos the way the toolkit used to read them (each decoded at full size, the batch held
  in memory, then the processor) against `toolkit.data.photos.open_photo` (decoded at the processor's size): wall time
  and peak memory, each in a fresh process;
- the input pipeline alone (`toolkit.data.vision.VisionCollator` in a torch DataLoader, micro-batches of 4 rows) with
  the batches built in the training process and in `data.image_workers: auto` worker processes: images per second.

It prints one table and needs no model weights and no GPU. It runs from the repository root (PYTHONPATH=.).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MEAN, STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
IMAGE_TOKEN_ID = 128256  # Llama 3.2 Vision's <|image|>
ROWS_PER_BATCH = 4


def spec():
    from toolkit.data.vision import ImageSpec

    return ImageSpec(tile_size=560, model_max_tiles=4, max_tiles=4, patches_per_tile=1601)


def processor():
    from toolkit.data.vision import mllama_helpers

    module, _, _ = mllama_helpers()
    return module.MllamaImageProcessorPil(size={"height": 560, "width": 560}, max_image_tiles=4,
                                          image_mean=MEAN, image_std=STD)


def write_photo(args: tuple[str, int, int, int]) -> None:
    """One photo-like JPEG: smooth light, texture and sensor noise at a quarter of the size, scaled up (as a
    phone's processing leaves it), with a different patch per file so no two files are the same."""
    import numpy as np
    from PIL import Image

    path, width, height, seed = args
    rng = np.random.default_rng(seed)
    w, h = width // 4, height // 4
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([128 + 90 * np.sin(x / 41 + y / 67 + seed), 128 + 80 * np.cos(y / 31 - x / 83),
                     128 + 60 * np.sin((x + y) / 127)], -1)
    base += rng.normal(0, 12, base.shape)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).resize((width, height), Image.BICUBIC)
    patch = Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8))
    image.paste(patch, (int(rng.integers(0, width - 512)), int(rng.integers(0, height - 512))))
    image.save(path, quality=90)


def make_photos(folder: Path, count: int, width: int, height: int) -> list[Path]:
    from multiprocessing import Pool

    paths = [folder / f"phone_{i:02d}.jpg" for i in range(count)]
    missing = [(str(p), width, height, i) for i, p in enumerate(paths) if not p.exists()]
    if missing:
        with Pool(min(len(missing), os.cpu_count() or 1)) as pool:
            pool.map(write_photo, missing)
    return paths


def rss_mib() -> float:
    with open("/proc/self/status", encoding="utf-8") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def batch_in_this_process(way: str, paths: list[str]) -> dict:
    """Child process: one batch of photos through decode + processor, the old way or the new; time and memory."""
    import resource

    from PIL import Image

    from toolkit.data import photos
    from toolkit.data.vision import image_features

    image_processor, image_spec = processor(), spec()
    before = rss_mib()
    cpu = time.process_time()
    started = time.perf_counter()
    if way == "full size":  # what the toolkit did: every image of the batch decoded whole, then processed
        images = []
        for path in paths:
            with Image.open(path) as image:
                image.load()
                images.append([image.convert("RGB")])
    else:
        images = [[photos.open_photo(path, image_spec)] for path in paths]
    decoded = time.perf_counter()
    features, _ = image_features(images, image_processor, image_spec)
    done = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"decode_s": decoded - started, "process_s": done - decoded, "total_s": done - started,
            "cpu_s": time.process_time() - cpu,
            "peak_mib": peak, "added_mib": peak - before, "shape": list(features["pixel_values"].shape)}


def measure_batch(way: str, paths: list[Path]) -> dict:
    command = [sys.executable, __file__, "--child", way, *map(str, paths)]
    out = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ}).stdout
    return json.loads(out.strip().splitlines()[-1])


def pipeline_rate(paths: list[Path], workers: int, rounds: int) -> float:
    """Images per second of the input pipeline alone: DataLoader + VisionCollator over the photos."""
    import torch

    from toolkit.data.vision import ImageInputs, VisionCollator

    collator = VisionCollator(ImageInputs(processor(), spec(), IMAGE_TOKEN_ID), pad_token_id=0)
    rows = [{"input_ids": [128000, IMAGE_TOKEN_ID, 791, 2217], "completion_mask": [0, 0, 1, 1],
             "image_paths": [str(p)]} for p in paths] * rounds
    loader = torch.utils.data.DataLoader(rows, batch_size=ROWS_PER_BATCH, collate_fn=collator, num_workers=workers)
    started = time.perf_counter()
    seen = sum(int(batch["pixel_values"].shape[0]) for batch in loader)
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--size", default="8000x6000")
    parser.add_argument("--folder", help="where the photos go (default: a temporary folder, removed after)")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(batch_in_this_process(args.child[0], args.child[1:])))
        return

    from rich.console import Console
    from rich.table import Table

    from toolkit.data.photos import loader_workers

    width, height = (int(v) for v in args.size.lower().split("x"))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="toolkit-photos-") as temporary:
        folder = Path(args.folder or temporary)
        folder.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        paths = make_photos(folder, args.images, width, height)
        made = time.perf_counter() - started
        size_mb = sum(p.stat().st_size for p in paths) / args.images / 1e6
        rows = []
        for way, label in (("full size", "full size (before)"), ("processor size", "processor size (after)")):
            result = measure_batch(way, paths)
            rows.append([f"{args.images} photos, {label}", f"{result['decode_s']:.1f}", f"{result['process_s']:.1f}",
                         f"{result['total_s']:.1f}", f"{result['cpu_s']:.1f}",
                         f"{result['peak_mib']:,.0f} (+{result['added_mib']:,.0f})",
                         f"{args.images / result['total_s']:.2f}"])
        auto = loader_workers("auto", 1)
        rates = {}
        for workers in sorted({0, auto}):
            rounds = max(1, -(-2 * max(workers, 1) * ROWS_PER_BATCH // args.images))
            rates[workers] = pipeline_rate(paths, workers, rounds)
            rows.append([f"input pipeline, {workers} worker{'s' * (workers != 1)}"
                         + (" (auto)" if workers == auto else ""), "", "", "", "",
                         "", f"{rates[workers]:.2f}"])
    table = Table(title=f"{args.images} photos {width}x{height} JPEG ({size_mb:.1f} MB each, written in {made:.0f} s), "
                        f"{cpus} CPUs (load {os.getloadavg()[0]:.1f}), Mllama processor 4 x 560 px",
                  title_justify="left")
    for i, name in enumerate(["", "decode s", "process s", "total s", "CPU s", "peak RSS MiB (+ batch)", "images/s"]):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=max(Console().width, 110)).print(table)


if __name__ == "__main__":
    main()
