"""What a run records about its contents, and how a resume's contents are compared with it (the CLI cases are in
test_sft.py, on a real interrupted run)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from types import SimpleNamespace

from PIL import Image

from toolkit.config.recipe import recipe_from_dict
from toolkit.runs import resume


def prepared_for(folder: Path, images: list[str]):
    train = folder / "train.jsonl"
    train.write_text('{"instruction": "q", "output": "a"}\n', encoding="utf-8")
    recipe = recipe_from_dict({"model": {"name": "builtin:tiny-mllama"}, "data": {"train": str(train)}})
    examples = [SimpleNamespace(images=[str(folder / name)]) for name in images]
    return SimpleNamespace(recipe=recipe, precision="fp32", train=SimpleNamespace(examples=examples),
                           eval=SimpleNamespace(examples=[]))


def drawing(path: Path, colour: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)


def test_images_are_fingerprinted_by_content_in_row_order(tmp_path):
    first, moved = tmp_path / "a", tmp_path / "b"
    for folder in (first, moved):
        drawing(folder / "door.png", "red")
        drawing(folder / "wall.png", "blue")
    one = resume.fingerprints(prepared_for(first, ["door.png", "wall.png", "door.png"]))
    assert one["images"]["count"] == 3
    assert one["data.train"] == [hashlib.sha256((first / "train.jsonl").read_bytes()).hexdigest()]
    assert resume.fingerprints(prepared_for(moved, ["door.png", "wall.png", "door.png"])) == one  # moved: same
    assert resume.fingerprints(prepared_for(first, ["wall.png", "door.png", "door.png"]))["images"] != one["images"]
    drawing(first / "door.png", "green")  # another picture under the same name
    assert resume.fingerprints(prepared_for(first, ["door.png", "wall.png", "door.png"]))["images"] != one["images"]


def test_a_changed_image_refuses_the_resume(tmp_path):
    drawing(tmp_path / "door.png", "red")
    before = resume.start_record(prepared_for(tmp_path, ["door.png"]), 1, "ddp")
    drawing(tmp_path / "door.png", "green")
    after = resume.start_record(prepared_for(tmp_path, ["door.png"]), 1, "ddp")
    checkpoint = tmp_path / "checkpoint-4"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text('{"global_step": 4, "epoch": 1.0}', encoding="utf-8")
    accepted, refused = resume.compare(before, after, checkpoint)
    old, new = before["contents"]["images"]["sha256"][:12], after["contents"]["images"]["sha256"][:12]
    assert refused == [f"the images the rows read changed (1 image, sha256 {old} -> 1 image, sha256 {new})"]
    assert accepted == {}


def test_a_saved_dataset_folder_is_fingerprinted_by_its_files(tmp_path):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "data-00000.arrow").write_bytes(b"rows")
    (folder / "state.json").write_text("{}", encoding="utf-8")
    digest = resume.content_digest(folder)
    shutil.copytree(folder, tmp_path / "copy")
    assert resume.content_digest(tmp_path / "copy") == digest
    (folder / "data-00000.arrow").write_bytes(b"other rows")
    assert resume.content_digest(folder) != digest
