"""Photos decoded at the size the model's image processor will use, not the size the camera took them at.

A phone photo has 12-48 megapixels; Mllama's processor shrinks every image to fit at most its tiles (four of 560 px,
1.25 megapixels). Decoding the whole photo and handing it to the processor costs seconds and about a gigabyte per
image. Here a JPEG is decoded with PIL's draft mode, which has libjpeg scale the image by 1/2, 1/4 or 1/8 while
decoding (from the DCT coefficients, so it is an area average, not a skip); other formats are decoded whole and
reduced right away with PIL's box filter. Either way the image handed on is never smaller than the processor's
target, and it is checked to lead the processor to the same tile layout and resized size as the full photo, so the
model gets the same tiles, within the processor's own resize error.

PIL warns (DecompressionBombWarning) above about 89 megapixels and refuses (DecompressionBombError) above twice
that. Photos from 108- and 200-megapixel phone cameras are real data, so the warning is silenced here; the refusal
stays, and `toolkit.data.vision.image_problem` turns it into one line before training.
"""

from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def quiet_size_warning():
    """PIL's DecompressionBombWarning off (its DecompressionBombError, twice the size, still raises)."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def processed_shape(size: tuple[int, int], spec) -> tuple[int, int, int, int]:
    """What the Mllama processor makes of an image of (width, height): its canvas (height, width) and the size
    (height, width) it resizes the image to, under the recipe's tile cap."""
    from toolkit.data.vision import mllama_helpers

    module, _, _ = mllama_helpers()
    width, height = size
    canvas_height, canvas_width = module.get_optimal_tiled_canvas(height, width, spec.max_tiles, spec.tile_size)
    new_height, new_width = module.get_image_size_fit_to_canvas(height, width, canvas_height, canvas_width,
                                                                 spec.tile_size)
    return int(canvas_height), int(canvas_width), int(new_height), int(new_width)


def reduced_size(size: tuple[int, int], factor: int) -> tuple[int, int]:
    """The size `Image.reduce(factor)` gives (a last partial block counts as a pixel)."""
    return -(-size[0] // factor), -(-size[1] // factor)


def reduce_factor(size: tuple[int, int], spec) -> int:
    """The largest integer factor that keeps the image no smaller than the processor's target and leads it to the
    same canvas and target size (1 when none does)."""
    wanted = processed_shape(size, spec)
    target_height, target_width = wanted[2], wanted[3]
    for factor in range(min(size[0] // max(target_width, 1), size[1] // max(target_height, 1)), 1, -1):
        smaller = reduced_size(size, factor)
        if smaller[0] >= target_width and smaller[1] >= target_height and processed_shape(smaller, spec) == wanted:
            return factor
    return 1


# EXIF orientations (a phone held upright stores the picture sideways and says so) -> the transpose that undoes it.
TRANSPOSES = {2: "FLIP_LEFT_RIGHT", 3: "ROTATE_180", 4: "FLIP_TOP_BOTTOM", 5: "TRANSPOSE", 6: "ROTATE_270",
              7: "TRANSVERSE", 8: "ROTATE_90"}
SIDEWAYS = {5, 6, 7, 8}  # these swap width and height


def orientation(image) -> int:
    """The EXIF orientation of an opened image (1, upright, when it has none or an unreadable one)."""
    try:
        value = image.getexif().get(0x0112, 1)  # ExifTags.Base.Orientation
    except Exception:  # a damaged EXIF block leaves the picture as stored, as PIL's own readers do
        return 1
    return value if value in TRANSPOSES else 1


def upright(size: tuple[int, int], turn: int) -> tuple[int, int]:
    return (size[1], size[0]) if turn in SIDEWAYS else size


def shown_size(path: str | Path) -> tuple[int, int]:
    """(width, height) as the photo is shown: after its EXIF orientation, without decoding it."""
    from PIL import Image

    with quiet_size_warning(), Image.open(path) as image:
        return upright(image.size, orientation(image))


def open_photo(path: str | Path, spec=None):
    """The image as RGB and upright (its EXIF orientation applied, as transformers' `load_image` does), decoded and
    reduced for `spec` (a `toolkit.data.vision.ImageSpec`; None: full size).

    The whole file is still read and decoded, so a truncated or corrupt file fails here as it would at full size.
    """
    from PIL import Image

    with quiet_size_warning():
        image = Image.open(path)
        try:
            turn = orientation(image)
            full = upright(image.size, turn)
            if spec is not None and image.format == "JPEG":
                wanted = processed_shape(full, spec)
                image.draft(None, upright((wanted[3], wanted[2]), turn))  # libjpeg's scale: never below that
                if image.size != upright(full, turn) and processed_shape(upright(image.size, turn), spec) != wanted:
                    image.close()
                    image = Image.open(path)  # this scale would change the tiles: decode at full size
            image.load()
            factor = reduce_factor(upright(image.size, turn), spec) if spec is not None else 1
            if factor > 1 and image.mode in ("RGB", "L"):  # reduced first: no full-size RGB copy is made
                rgb = image.reduce(factor).convert("RGB")
            else:
                rgb = image.convert("RGB")
                rgb = rgb.reduce(factor) if factor > 1 else rgb
        finally:
            image.close()
    return rgb.transpose(getattr(Image.Transpose, TRANSPOSES[turn])) if turn != 1 else rgb


def check_decodes(path: str | Path) -> None:
    """Decode the whole file, as cheaply as its format allows (a JPEG at 1/8 scale: every byte is still read, so a
    truncated file fails); raises what PIL raises for a file that is not a usable image."""
    from PIL import Image

    with quiet_size_warning(), Image.open(path) as image:
        if image.format == "JPEG":
            image.draft(None, (1, 1))
        image.load()


PREFETCH = 2  # batches each DataLoader worker keeps ready (torch's default prefetch_factor)


def shared_memory_free() -> int | None:
    """Free bytes in /dev/shm, where DataLoader workers hand their batches over (None where there is none)."""
    import shutil

    try:
        return shutil.disk_usage("/dev/shm").free
    except OSError:
        return None


def batch_bytes(spec, rows: int) -> int:
    """The pixel values of a micro-batch of `rows` one-image rows at the model's tile count, in float32."""
    return rows * spec.model_max_tiles * 3 * spec.tile_size * spec.tile_size * 4


def loader_workers(setting: int | str, processes_here: int | None = None, batch_size_bytes: int = 0) -> int:
    """DataLoader worker processes per training process for image data: `auto` shares this machine's CPUs among
    its training processes, keeping one core each for the training loop (at most 8 workers each), and no more
    than the shared memory holds (each worker keeps `PREFETCH` batches there; a container's default /dev/shm of
    64 MB holds none, and a worker would die of a bus error). A number is taken as it is (0: build batches in the
    training process)."""
    if setting != "auto":
        return int(setting)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    processes = max(processes_here or int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    workers = max(1, min(8, cpus // processes - 1))
    free = shared_memory_free()
    if batch_size_bytes and free is not None:
        workers = min(workers, free // (processes * PREFETCH * batch_size_bytes))
    return int(workers)
