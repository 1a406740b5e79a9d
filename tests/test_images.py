"""Image rows on the built-in Mllama: the official rendering, the loss mask, the batches the model reads, mixed
training, where the adapters learn, eval/generate/merge on images, and every validation error's text."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import term_rows, tiny_recipe, write_jsonl
from PIL import Image
from safetensors.torch import load_file

from toolkit import api
from toolkit.cli import main
from toolkit.config.recipe import DataSection, recipe_from_dict
from toolkit.data import encode, photos, reading, vision
from toolkit.model import loading

QUESTION = "이 현장 사진의 결함은?"
ANSWER = "철근 피복 부족"
OFFICIAL = (  # Llama 3.2 Vision Instruct's template for [image, text] -> answer: no system block, image first
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|>" + QUESTION + "<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n" + ANSWER + "<|eot_id|>"
)
SHAPES = {"상자": (200, 40, 40), "원": (40, 160, 40), "막대": (40, 40, 200)}


@pytest.fixture(scope="module")
def tokenizer():
    return loading.load_tokenizer("builtin:tiny-mllama")


@pytest.fixture(scope="module")
def image_data(tmp_path_factory) -> dict:
    """Drawn images (one color per shape) and rows naming them, beside text rows, in their own folder."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "pics").mkdir()
    rows = []
    for name, color in SHAPES.items():
        for k in range(2):
            file = f"pics/{name}_{k}.png"
            Image.new("RGB", (40 + 20 * k, 40), color).save(folder / file)
            rows.append({"image": file, "instruction": "이 그림은 무엇입니까?", "output": f"{name} 그림입니다.",
                         "terms": [name]})
    images = write_jsonl(folder / "images.jsonl", rows)
    mixed = write_jsonl(folder / "mixed.jsonl", rows + term_rows())
    return {"folder": folder, "images": str(images), "mixed": str(mixed), "rows": rows}


def section(**values) -> DataSection:
    return DataSection(train="t.jsonl", **values)


def encode_one(tokenizer, fields, source="x/t.jsonl", **values):
    return encode.encode_rows([reading.Row(source, 1, fields)], section(**values), tokenizer, 4096).examples[0]


def test_an_image_row_renders_as_the_official_template(tokenizer):
    example = encode_one(tokenizer, {"image": "a.png", "instruction": QUESTION, "output": ANSWER})
    assert tokenizer.decode(example.input_ids) == OFFICIAL
    assert example.input_ids == tokenizer(OFFICIAL, add_special_tokens=False)["input_ids"]
    assert example.images == (str(Path("x/a.png")),)


def test_the_loss_covers_the_answer_and_eot_never_the_image(tokenizer):
    example = encode_one(tokenizer, {"image": "a.png", "instruction": QUESTION, "output": ANSWER})
    image_id = tokenizer.convert_tokens_to_ids("<|image|>")
    learned = [t for t, m in zip(example.input_ids, example.completion_mask) if m]
    assert tokenizer.decode(learned) == ANSWER + "<|eot_id|>" and image_id not in learned
    assert example.input_ids.count(image_id) == 1
    assert tokenizer.decode(example.input_ids[: example.input_ids.index(image_id)]) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")  # first in the user turn


def test_several_images_come_first_in_order(tokenizer):
    example = encode_one(tokenizer, {"images": ["a.png", "b.png"], "instruction": QUESTION, "output": ANSWER})
    assert tokenizer.decode(example.input_ids).startswith(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n<|image|><|image|>" + QUESTION)
    assert example.images == (str(Path("x/a.png")), str(Path("x/b.png")))


def test_image_paths_follow_the_data_file_or_image_root(tokenizer, tmp_path):
    fields = {"image": "pics/a.png", "instruction": QUESTION, "output": ANSWER}
    assert encode_one(tokenizer, fields, source="/data/set/rows.jsonl").images == ("/data/set/pics/a.png",)
    rooted = encode_one(tokenizer, fields, source="/data/set/rows.jsonl", image_root=str(tmp_path))
    assert rooted.images == (str(tmp_path / "pics/a.png"),)


def collated(image_data, tokenizer, rows):
    recipe = recipe_from_dict({"model": {"name": "builtin:tiny-mllama"}, "data": {"train": image_data["mixed"]}})
    encoded = encode.encode_rows([reading.Row(image_data["mixed"], i + 1, r) for i, r in enumerate(rows)],
                               recipe.data, tokenizer, 512)
    collator = vision.training_collator(recipe, loading.load_config("builtin:tiny-mllama"), tokenizer, "fp32")
    dataset = encode.to_dataset(encoded.examples)
    return encoded, collator([dataset[i] for i in range(len(rows))]), vision.loader_workers(recipe, collator.images)


def collator_spec():
    return vision.image_spec(loading.load_processor("builtin:tiny-mllama", None),
                             loading.load_config("builtin:tiny-mllama"), None)


def test_a_mixed_batch_gives_text_rows_no_image_and_image_rows_their_own(image_data, tokenizer):
    rows = [image_data["rows"][0], term_rows()[0], image_data["rows"][3]]
    encoded, batch, workers = collated(image_data, tokenizer, rows)
    assert workers == photos.loader_workers("auto", batch_size_bytes=photos.batch_bytes(collator_spec(), 2))
    image_id = tokenizer.convert_tokens_to_ids("<|image|>")
    assert batch["pixel_values"].shape == (3, 1, 1, 3, 56, 56)
    assert batch["pixel_values"][1].abs().sum() == 0  # the text row's slot is empty, not a fake image
    per_row = batch["cross_attention_mask"].sum(dim=(2, 3))
    for i, example in enumerate(encoded.examples):
        start = example.input_ids.index(image_id) if example.images else None
        expected = torch.zeros(batch["input_ids"].shape[1], dtype=per_row.dtype)
        if start is not None:
            expected[start:] = 1  # from the image token to the end, as the Mllama processor marks it
        assert torch.equal(per_row[i], expected)
        labels = batch["labels"][i, : len(example.input_ids)].tolist()
        assert labels == [t if m else -100 for t, m in zip(example.input_ids, example.completion_mask)]
    assert not (batch["labels"] == image_id).any()
    assert batch["aspect_ratio_ids"].tolist() == [[1], [0], [1]]


def test_image_loader_workers_follow_the_recipe_the_cpus_and_shared_memory(tokenizer, monkeypatch):
    """`auto` on 16 CPUs is 8 workers; a /dev/shm that cannot hold two batches of `train.batch_size` rows per worker
    allows fewer (the tiny model: one tile of 56 px, 37,632 bytes a row); a number in the recipe is taken as it is."""
    config = loading.load_config("builtin:tiny-mllama")
    monkeypatch.setattr(photos.os, "sched_getaffinity", lambda _: set(range(16)), raising=False)
    monkeypatch.setattr(photos, "shared_memory_free", lambda: None)

    def workers(**data) -> int:
        recipe = recipe_from_dict({"model": {"name": "builtin:tiny-mllama"}, "data": {"train": "t.jsonl", **data},
                                   "train": {"batch_size": 10}})
        return vision.loader_workers(recipe, vision.training_collator(recipe, config, tokenizer, "fp32").images)

    assert workers() == 8
    monkeypatch.setattr(photos, "shared_memory_free", lambda: 3 * 2 * 10 * 37_632)  # three workers' two batches
    assert workers() == 3
    assert workers(image_workers=5) == 5 and workers(image_workers=0) == 0


def test_two_images_in_a_row_are_both_read_by_the_text_after_them(image_data, tokenizer):
    row = {"images": [image_data["rows"][0]["image"], image_data["rows"][2]["image"]], "instruction": "비교하세요.",
           "output": "다릅니다."}
    encoded, batch, _ = collated(image_data, tokenizer, [row, term_rows()[0]])
    assert batch["pixel_values"].shape[:3] == (2, 2, 1) and batch["cross_attention_mask"].shape[2] == 2
    image_id = tokenizer.convert_tokens_to_ids("<|image|>")
    first = encoded.examples[0].input_ids.index(image_id)
    reads = batch["cross_attention_mask"][0, :, :, 0]
    assert reads[first + 2 :].all() and not reads[:first].any()  # every later token sees both images
    assert not batch["cross_attention_mask"][1].any()


def test_a_text_only_batch_carries_no_image_inputs(image_data, tokenizer):
    _, batch, _ = collated(image_data, tokenizer, term_rows()[:2])
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_a_tile_cap_keeps_the_models_tile_count_and_aspect_ids():
    """A 4-tile model capped at 2 tiles: pixels still carry 4 tile slots, and a 2x1 image keeps the 4-tile table's
    id for (2, 1), not the 2-tile table's."""
    from transformers.models.mllama.image_processing_pil_mllama import (
        MllamaImageProcessorPil,
    )

    processor = MllamaImageProcessorPil(size={"height": 56, "width": 56}, max_image_tiles=4)
    tall = Image.new("RGB", (50, 100), (10, 20, 30))
    spec = vision.ImageSpec(tile_size=56, model_max_tiles=4, max_tiles=2, patches_per_tile=17)
    features, tiles = vision.image_features([[tall]], processor, spec)
    assert features["pixel_values"].shape == (1, 1, 4, 3, 56, 56) and tiles == [[2]]
    assert features["aspect_ratio_ids"].tolist() == [[5]]  # (2, 1) in the 4-tile table: (1,1) (1,2) (1,3) (1,4) (2,1)
    assert features["aspect_ratio_mask"].tolist() == [[[1, 1, 0, 0]]]
    uncapped, _ = vision.image_features([[tall]], processor, vision.ImageSpec(56, 4, 4, 17))
    assert uncapped["aspect_ratio_ids"].tolist() == [[5]]
    assert vision.tiles_for((50, 100), spec) == 2 and vision.tiles_for((400, 100), spec) == 2
    assert spec.vision_tokens_per_image == 4 * 17


def test_capped_tiles_are_padded_after_the_images_content(tmp_path):
    """Under a cap of 2 on a 4-tile model, a batch's tiles 0-1 hold the image (as the capped processor made them)
    and tiles 2-3 are padding: pixels, the aspect-ratio mask and the cross-attention mask agree tile by tile."""
    from transformers.models.mllama.image_processing_pil_mllama import (
        MllamaImageProcessorPil,
    )

    processor = MllamaImageProcessorPil(size={"height": 56, "width": 56}, max_image_tiles=4)
    Image.new("RGB", (50, 100), (200, 120, 30)).save(tmp_path / "tall.png")
    spec = vision.ImageSpec(tile_size=56, model_max_tiles=4, max_tiles=2, patches_per_tile=17)
    inputs = vision.ImageInputs(processor, spec, image_token_id=7)
    ids = torch.tensor([[5, 7, 9, 9, 9], [5, 9, 9, 0, 0]])
    batch = inputs.add({"input_ids": ids}, [[str(tmp_path / "tall.png")], []])
    own = processor(images=[[Image.open(tmp_path / "tall.png").convert("RGB")]], max_image_tiles=2,
                    return_tensors="pt")["pixel_values"]
    assert own.shape[2] == 2 and batch["pixel_values"].shape == (2, 1, 4, 3, 56, 56)
    assert torch.equal(batch["pixel_values"][0, 0, :2], own[0, 0])  # the content first, unchanged
    assert batch["pixel_values"][0, 0, 2:].abs().sum() == 0 and batch["pixel_values"][1].abs().sum() == 0
    assert batch["aspect_ratio_mask"][0].tolist() == [[1, 1, 0, 0]]
    assert batch["cross_attention_mask"][0, :, 0].tolist() == [[0, 0, 0, 0]] + [[1, 1, 0, 0]] * 4
    assert not batch["cross_attention_mask"][1].any()


def four_tile_model(folder: Path) -> Path:
    """The built-in model's shape with a 4-tile vision tower (random weights), saved as a local model folder."""
    from transformers import (
        GenerationConfig,
        MllamaForConditionalGeneration,
        MllamaProcessor,
    )
    from transformers.models.mllama.image_processing_pil_mllama import (
        get_all_supported_aspect_ratios,
    )

    from toolkit.model import builtin

    tokenizer = loading.load_tokenizer("builtin:tiny-mllama")
    config = loading.load_config("builtin:tiny-mllama")
    config.vision_config.max_num_tiles = 4
    config.vision_config.supported_aspect_ratios = [list(r) for r in get_all_supported_aspect_ratios(4)]
    torch.manual_seed(0)
    model = MllamaForConditionalGeneration(config)
    builtin.init_text_weights(model, config)
    model.generation_config = GenerationConfig.from_pretrained(builtin.ensure_builtin("builtin:tiny-mllama"))
    model.save_pretrained(folder)
    processor = builtin.image_processor()
    processor.max_image_tiles = 4
    MllamaProcessor(image_processor=processor, tokenizer=tokenizer, chat_template=builtin.chat_template()
                    ).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_run_capped_below_the_models_tiles_trains(image_data, tmp_path, monkeypatch):
    """data.max_image_tiles: 2 on a 4-tile model: every batch carries the model's 4 tile slots, content first."""
    seen = []
    collate = vision.VisionCollator.__call__

    def recording(self, examples):
        batch = collate(self, examples)
        seen.append(batch["aspect_ratio_mask"][:, 0].tolist() if "aspect_ratio_mask" in batch else None)
        assert batch["pixel_values"].shape[2:] == (4, 3, 56, 56)
        return batch

    monkeypatch.setattr(vision.VisionCollator, "__call__", recording)
    model = four_tile_model(tmp_path / "model")
    recipe = tiny_recipe(tmp_path, {"train": image_data["images"]}, model={"name": str(model)},
                         train={"max_steps": 2, "batch_size": 6, "save_steps": 2})
    # data.image_workers=0: the batches are built in this process, where `seen` records them
    api.train(recipe, tmp_path / "run", overrides=["data.max_image_tiles=2", "data.image_workers=0"])
    masks = [mask for batch in seen for mask in batch]
    assert len(masks) == 12 and {tuple(m) for m in masks} == {(1, 0, 0, 0), (1, 1, 0, 0)}


@pytest.fixture(scope="module")
def image_run(tmp_path_factory, image_data) -> Path:
    folder = tmp_path_factory.mktemp("image-run")
    recipe = tiny_recipe(folder, {"train": image_data["mixed"], "eval": image_data["images"]},
                         train={"max_steps": 8, "batch_size": 6, "learning_rate": 0.01, "save_steps": 8})
    return api.train(recipe, folder / "run").path


def cross_attention_b(run_dir: Path) -> dict:
    return {k: v for k, v in load_file(str(run_dir / "adapter_model.safetensors")).items()
            if "cross_attn" in k and "lora_B" in k}


def test_mixed_rows_train_and_move_the_cross_attention_adapters(image_run, tiny_run):
    summary = json.loads((image_run / "metrics.json").read_text(encoding="utf-8"))["summary"]
    assert summary["steps"] == 8 and summary["train_rows"] == 18
    moved = cross_attention_b(image_run)
    assert len(moved) == 4 and all(t.abs().max() > 0 for t in moved.values())
    assert all(t.abs().max() == 0 for t in cross_attention_b(tiny_run).values())  # text rows never reach them


def test_eval_answers_image_rows(image_run, image_data):
    assert main(["eval", str(image_run), "--compare-base", "--max-new-tokens", "16"]) == 0
    records = [json.loads(line) for line in (image_run / "eval_predictions.jsonl").read_text("utf-8").splitlines()]
    assert len(records) == 6 and all(len(r["images"]) == 1 and Path(r["images"][0]).is_file() for r in records)
    assert [r["reference"] for r in records] == [r["output"] for r in image_data["rows"]]
    assert any(r["prediction"] != r["base_prediction"] for r in records)


def test_generate_reads_the_image(image_run, image_data, capsys):
    from toolkit.commands.generate import prompt_ids
    from toolkit.runs.rundir import load_trained

    pics = image_data["folder"] / "pics"
    assert main(["generate", str(image_run), "이 그림은 무엇입니까?", "--image", str(pics / "상자_0.png"),
                 "--max-new-tokens", "6"]) == 0
    model, tokenizer, recipe = load_trained(image_run)
    red = prompt_ids("이 그림은 무엇입니까?", recipe, tokenizer, str(pics / "상자_0.png"))
    blue = prompt_ids("이 그림은 무엇입니까?", recipe, tokenizer, str(pics / "막대_0.png"))
    assert red["pixel_values"].shape == (1, 1, 1, 3, 56, 56) and "cross_attention_mask" in red
    assert torch.equal(red["input_ids"], blue["input_ids"])
    with torch.no_grad():
        difference = (model(**red).logits[0, -1] - model(**blue).logits[0, -1]).abs().max()
    assert difference > 1e-3  # same words, another picture: the model's next word changes
    assert main(["generate", str(image_run), "hi", "--image", str(image_data["folder"] / "nope.png")]) == 2
    assert "--image: image not found" in capsys.readouterr().out


def test_merge_checks_an_image_prompt_when_the_adapter_reads_images(image_run, tmp_path):
    out = tmp_path / "merged"
    assert main(["merge", str(image_run), "--output", str(out), "--dtype", "fp32"]) == 0
    report = json.loads((out / "merge_report.json").read_text(encoding="utf-8"))
    assert report["passed"] and report["image_prompts"] == 4


@pytest.fixture()
def bad_images(tmp_path) -> Path:
    Image.new("RGB", (30, 30), "red").save(tmp_path / "ok.png")
    full = (tmp_path / "ok.png").read_bytes()
    Image.new("RGB", (300, 300), "blue").save(tmp_path / "big.jpg", quality=95)
    (tmp_path / "cut.jpg").write_bytes((tmp_path / "big.jpg").read_bytes()[:600])
    (tmp_path / "notes.png").write_text("not an image", encoding="utf-8")
    (tmp_path / "folder.png").mkdir()
    assert full
    return tmp_path


def test_every_image_problem_is_named_with_its_line(bad_images):
    rows = [
        {"image": "ok.png", "instruction": "q", "output": "a"},
        {"image": "missing.png", "instruction": "q", "output": "a"},
        {"image": "cut.jpg", "instruction": "q", "output": "a"},
        {"image": "notes.png", "instruction": "q", "output": "a"},
        {"image": "folder.png", "instruction": "q", "output": "a"},
        {"image": 3, "instruction": "q", "output": "a"},
        {"images": "ok.png", "instruction": "q", "output": "a"},
        {"image": "ok.png", "images": ["ok.png"], "instruction": "q", "output": "a"},
        {"image": "ok.png", "instruction": "q", "output": "a", "terms": "q"},
    ]
    path = write_jsonl(bad_images / "rows.jsonl", rows)
    good, problems = reading.parse_rows(path, section())
    assert [r.line for r in good] == [1]
    assert problems[0] == f"{path}:2: image: image not found: {bad_images / 'missing.png'}"
    assert problems[1].startswith(f"{path}:3: image: unreadable image {bad_images / 'cut.jpg'} (")
    assert problems[2:] == [
        f"{path}:4: image: not an image file PIL can read: {bad_images / 'notes.png'}",
        f"{path}:5: image: not a file: {bad_images / 'folder.png'}",
        f"{path}:6: field 'image' must be a string, got number (a path to the image file)",
        f"{path}:7: field 'images' must be a non-empty list of image paths",
        f"{path}:8: fields 'image' and 'images' cannot be used together; use 'images' for several",
        f"{path}:9: field 'terms' must be a list of non-empty strings",
    ]


def test_a_system_prompt_beside_an_image_is_refused(bad_images):
    path = write_jsonl(bad_images / "rows.jsonl", [{"image": "ok.png", "instruction": "q", "output": "a"}])
    _, problems = reading.parse_rows(path, section(system_prompt="건설 도우미"))
    assert problems == [f"{path}:1: a row with an image cannot have a system prompt (Llama 3.2 Vision's template "
                        "refuses it); drop data.system_prompt or the row's system turn"]


def test_bad_images_stop_sft_before_anything_is_written(bad_images, tmp_path, capsys):
    path = write_jsonl(bad_images / "rows.jsonl", term_rows() + [{"image": "missing.png", "instruction": "q",
                                                                   "output": "a"}])
    recipe = tiny_recipe(tmp_path, {"train": str(path)})
    assert main(["sft", str(recipe), "--output-dir", str(tmp_path / "run")]) == 2
    assert f"{path}:13: image: image not found" in capsys.readouterr().out.replace("\n", "")
    assert not (tmp_path / "run").exists()


def test_a_cut_never_removes_an_image(tokenizer):
    fields = {"image": "a.png", "instruction": "가" * 200, "output": "답"}
    encoding = encode.encode_rows([reading.Row("t.jsonl", 1, fields)], section(), tokenizer, limit=4)
    assert encoding.rows == [] and encoding.dropped_empty == 1  # the answer went first
    short = {"image": "a.png", "instruction": "q", "output": "답 " * 50}
    cut = encode.encode_rows([reading.Row("t.jsonl", 1, short)], section(), tokenizer, limit=20)
    assert cut.truncated == 1 and cut.examples[0].input_ids.count(tokenizer.convert_tokens_to_ids("<|image|>")) == 1


def test_validate_reports_image_cost(image_data, tmp_path, capsys):
    recipe = tiny_recipe(tmp_path, {"train": image_data["mixed"]})
    assert main(["validate", str(recipe)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "6 train rows with 6 images; tiles/image p50 1 max 1 (cap 1 of 1)" in out


def test_a_text_model_refuses_image_rows(image_data, tmp_path, monkeypatch, capsys):
    config = loading.load_config("builtin:tiny-mllama")
    monkeypatch.setattr(loading, "is_vision_config", lambda _: False)
    recipe = tiny_recipe(tmp_path, {"train": image_data["mixed"]})
    assert main(["validate", str(recipe)]) == 2
    assert "6 rows have images, but builtin:tiny-mllama is not a vision model" in capsys.readouterr().out
    assert config.vision_config is not None


@pytest.mark.parametrize(("setting", "line"), [
    ("train.padding_free=true", "train.padding_free is for text rows; 6 rows have images: set it to false"),
    ("model.attn_implementation=flex_attention",
     "model.attn_implementation=flex_attention is for text rows; 6 rows have images: use sdpa"),
])
def test_image_rows_refuse_text_only_settings_before_any_weight_loads(image_data, tmp_path, monkeypatch, capsys,
                                                                       setting, line):
    from toolkit.config.precision import Accelerator

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    # on a GPU, where flex attention may train: the refusal is for the image rows, not for the CPU
    monkeypatch.setattr(loading, "detect_accelerator", lambda: Accelerator(cuda=True, bf16=True, name="GPU"))
    recipe = tiny_recipe(tmp_path, {"train": image_data["mixed"]})
    assert main(["sft", str(recipe), "--set", setting, "--output-dir", str(tmp_path / "run")]) == 2
    assert line in " ".join(capsys.readouterr().out.split())
    assert not (tmp_path / "run").exists()


def test_data_files_can_be_listed(image_data, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(image_data["folder"], copy)
    section_ = DataSection(train=[str(copy / "images.jsonl"), str(copy / "mixed.jsonl")])
    train, _ = reading.load_splits(section_, seed=1)
    assert len(train) == 6 + 18 and train[0].source == str(copy / "images.jsonl")


def test_validate_refuses_a_tokenizer_whose_image_token_is_not_the_models(image_data, tmp_path, capsys):
    """A local checkpoint folder whose config reads images at another id than its tokenizer's <|image|>."""
    from toolkit.model import builtin

    folder = tmp_path / "checkpoint"
    shutil.copytree(builtin.ensure_builtin("builtin:tiny-mllama"), folder)
    config = json.loads((folder / "config.json").read_text())
    image_id = config["image_token_index"]
    config["image_token_index"] = image_id - 1
    (folder / "config.json").write_text(json.dumps(config))
    recipe = tiny_recipe(tmp_path, {"train": image_data["mixed"]}, model={"name": str(folder)})
    assert main(["validate", str(recipe)]) == 2
    out = " ".join(capsys.readouterr().out.split())
    assert (f"{folder}: the tokenizer's <|image|> is id {image_id} but the model's config says image_token_index="
            f"{image_id - 1}; the checkpoint's tokenizer and config do not belong together") in out
    text_only = tiny_recipe(tmp_path, {"train": str(image_data["folder"] / "text.jsonl")}, model={"name": str(folder)})
    write_jsonl(image_data["folder"] / "text.jsonl", term_rows())
    assert main(["validate", str(text_only)]) == 0  # text rows never read the image token


def cuda_like_int8_quant(monkeypatch):
    """bitsandbytes' LLM.int8() quantization as its CUDA backend behaves: an input of more than 2 dims with a value
    at or above the threshold fails in its outlier search (`argwhere(...).view(-1)` on a non-viewable index list);
    the CPU backend's `view` happens to work, so the crash the GPU host showed needs this stand-in here."""
    import bitsandbytes.functional as F

    def checked(real):
        def quant(A, *args, threshold=0.0, **kwargs):
            if A.dim() > 2 and threshold > 0 and bool((A.abs() >= threshold).any()):
                raise RuntimeError("view size is not compatible with input tensor's size and stride")
            return real(A, *args, threshold=threshold, **kwargs)
        return quant

    for name in ("int8_vectorwise_quant", "int8_double_quant"):
        monkeypatch.setattr(F, name, checked(getattr(F, name)))


def test_an_8bit_layer_gets_rows_and_gives_back_the_inputs_shape(monkeypatch):
    import bitsandbytes as bnb

    cuda_like_int8_quant(monkeypatch)
    torch.manual_seed(0)
    layer = bnb.nn.Linear8bitLt(24, 16, bias=True, has_fp16_weights=False, threshold=0.5)
    layer.load_state_dict({"weight": torch.randn(16, 24), "bias": torch.randn(16)})
    layer.eval()  # in training mode the CPU backend takes a dequantizing matmul with no outlier search
    x = torch.randn(2, 3, 1, 5, 24)
    with pytest.raises(RuntimeError, match="view size"):
        layer(x)
    assert loading.feed_int8_layers_rows(torch.nn.Sequential(layer)) == 1
    out = layer(x)
    assert out.shape == (2, 3, 1, 5, 16)
    assert torch.equal(out, layer(x.reshape(-1, 24)).reshape(2, 3, 1, 5, 16))
    assert layer(x[0, 0]).shape == (1, 5, 16)  # 3-D and shorter pass as they are


def test_an_8bit_image_run_evaluates_and_generates_with_cuda_like_int8(image_data, tmp_path, monkeypatch, capsys):
    recipe = tiny_recipe(tmp_path, {"train": image_data["mixed"], "eval": image_data["images"]},
                         train={"max_steps": 2, "batch_size": 6, "save_steps": 2},
                         quantization={"mode": "8bit", "int8_threshold": 0.5})
    run_dir = api.train(recipe, tmp_path / "run8").path
    cuda_like_int8_quant(monkeypatch)
    picture = str(image_data["folder"] / "pics" / "상자_0.png")
    generate = ["generate", str(run_dir), "이 그림은 무엇입니까?", "--image", picture, "--max-new-tokens", "3"]
    assert main(generate) == 0
    assert main(["eval", str(run_dir), "--limit", "2", "--max-new-tokens", "3"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(loading, "feed_int8_layers_rows", lambda model: 0)  # the projector gets its 5-D input
    assert main(generate) == 1
    assert "view size is not compatible" in capsys.readouterr().out
