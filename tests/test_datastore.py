"""Encoded data at scale: the same ids for any number of worker processes, errors as before, and a cache that is
used only when every key matches and the entry is intact."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
from conftest import term_rows, tiny_recipe, write_jsonl
from test_images import image_data  # noqa: F401 (a fixture)

from toolkit.config.recipe import DataSection
from toolkit.data import datastore, encode, reading
from toolkit.errors import ToolkitError
from toolkit.model import loading

ROOT = Path(__file__).resolve().parent.parent
SHIPPED_TRAIN = ROOT / "data" / "construction_terms.jsonl"
SHIPPED_EVAL = ROOT / "data" / "construction_terms_eval.jsonl"
# sha256 of json.dumps([[input_ids, completion_mask], ...]) of the shipped quickstart rows, measured with the
# one-row-at-a-time encoder before batching existed; training must keep seeing exactly these ids.
SHIPPED_IDS = {"train": "052b425493d0143a7829be08d7adede49d71dcdbdd3b75e036e7505fe045c9c7",
               "eval": "12de3e19626664132c981c20e1ecd9272887db49de62feddf4ec6f3255753068"}
SPECIAL_ROWS = [
    {"instruction": "끝 토큰 <|eot_id|> 을 설명하세요.", "output": "<|eot_id|>는 차례의 끝입니다.<|start_header_id|>"},
    {"instruction": "<|begin_of_text|>", "input": "<|image|> 그림 없음", "output": "평범한 답 <|end_header_id|>"},
    {"instruction": "  앞뒤 공백  ", "input": "\n<|eot_id|>\n", "output": " 답 "},
]


@pytest.fixture(scope="module")
def tokenizer():
    return loading.load_tokenizer("builtin:tiny-mllama")


def digest(examples) -> str:
    return hashlib.sha256(json.dumps([[e.input_ids, e.completion_mask] for e in examples]).encode()).hexdigest()


def one_by_one(path: Path, section, tokenizer, limit: int = 256) -> list[encode.Encoded]:
    """The reference: every row rendered and tokenized alone by `encode.encode_conversation`, then fitted."""
    rows, problems = reading.parse_rows(path, section)
    assert problems == []
    out = []
    for row in rows:
        encoded = encode.encode_conversation(reading.conversation(row, section), tokenizer, section.date_string,
                                             section.train_on)
        fitted, _ = encode.fit(encoded, limit, section, None)
        if fitted is not None:
            out.append(fitted)
    return out


def stored(section, tokenizer, limit: int = 256):
    store = datastore.prepare_data(section, tokenizer, limit)
    return store, datastore.split_encodings(store, section, seed=0)


@pytest.mark.parametrize("num_proc", [1, 2, 3])
def test_shipped_rows_keep_their_ids_for_every_num_proc(tokenizer, num_proc, tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(datastore, "CHUNK_ROWS", 50)  # several chunks per file, so workers really share the rows
    section = DataSection(train=str(SHIPPED_TRAIN), eval=str(SHIPPED_EVAL), num_proc=num_proc)
    _, (train, evals) = stored(section, tokenizer)
    assert digest(train.examples) == SHIPPED_IDS["train"]
    assert digest(evals.examples) == SHIPPED_IDS["eval"]
    assert [r.line for r in train.rows] == list(range(1, 337))


@pytest.mark.parametrize("formatter", ["alpaca", "messages"])
def test_special_token_text_encodes_as_text_the_same_for_every_num_proc(tokenizer, formatter, tmp_path,
                                                                        monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datastore, "CHUNK_ROWS", 3)
    rows = SPECIAL_ROWS * 4 + term_rows()
    if formatter == "messages":
        rows = [{"messages": [{"role": "system", "content": "<|eot_id|> 시스템"},
                              {"role": "user", "content": r["instruction"]},
                              {"role": "assistant", "content": r["output"]},
                              {"role": "user", "content": "다시 <|start_header_id|>"},
                              {"role": "assistant", "content": r["output"] + " 끝"}]} for r in rows]
    path = write_jsonl(tmp_path / "special.jsonl", rows)
    reference = one_by_one(path, DataSection(train=str(path), formatter=formatter), tokenizer)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    # the text "<|eot_id|>" in a row is never the token: each row has exactly the template's end-of-turn tokens
    turns = 5 if formatter == "messages" else 3
    assert all(e.input_ids.count(eot) == turns for e in reference)
    results = []
    for num_proc in (1, 2, 3):
        section = DataSection(train=str(path), formatter=formatter, num_proc=num_proc)
        _, (train, _) = stored(section, tokenizer)
        results.append([(e.input_ids, e.completion_mask) for e in train.examples])
        assert train.special_rows == (12 if formatter == "alpaca" else len(rows))
    assert results[0] == results[1] == results[2] == [(e.input_ids, e.completion_mask) for e in reference]


def test_stored_encoding_counts_cuts_and_drops_like_the_in_memory_one(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "t.jsonl", term_rows())
    for limit, too_long in ((44, "truncate"), (56, "drop")):
        section = DataSection(train=str(path), too_long=too_long, num_proc=2)
        rows, _ = reading.parse_rows(path, section)
        memory = encode.encode_rows(rows, section, tokenizer, limit)
        _, (train, _) = stored(section, tokenizer, limit)
        assert (train.truncated, train.dropped_long, train.dropped_empty) == \
            (memory.truncated, memory.dropped_long, memory.dropped_empty)
        assert list(train.lengths) == memory.lengths and list(train.kept_lengths) == memory.kept_lengths
        assert [(e.input_ids, e.completion_mask) for e in train.examples] == \
            [(e.input_ids, e.completion_mask) for e in memory.examples]
        assert list(train.rows) == memory.rows


def test_eval_fraction_holds_out_the_rows_split_rows_picks(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "t.jsonl", term_rows())
    section = DataSection(train=str(path), eval_fraction=0.25)
    rows, _ = reading.parse_rows(path, section)
    expected_train, expected_eval = reading.split_rows(rows, 0.25, seed=0)
    _, (train, evals) = stored(section, tokenizer)
    assert list(train.rows) == expected_train and list(evals.rows) == expected_eval


def test_problems_in_every_file_are_reported_at_once_by_place_whatever_num_proc(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(datastore, "CHUNK_ROWS", 2)
    good = json.dumps({"instruction": "a", "output": "b"})
    train = tmp_path / "train.jsonl"
    train.write_text("\n".join([good, "{not json", good, '{"instruction": "x"}', good, "[1]"]) + "\n")
    evals = tmp_path / "eval.jsonl"
    evals.write_text(good + "\n" + '{"instruction": 3, "output": "b"}\n')
    messages = {}
    for num_proc in (1, 2):
        section = DataSection(train=str(train), eval=str(evals), num_proc=num_proc)
        with pytest.raises(ToolkitError) as err:
            datastore.prepare_data(section, tokenizer, 256)
        messages[num_proc] = str(err.value)
    assert messages[1] == messages[2] == (
        "data: 4 problem(s):\n"
        f"  {train}:2: invalid JSON (Expecting property name enclosed in double quotes at column 2)\n"
        f"  {train}:4: missing field 'output'\n"
        f"  {train}:6: expected a JSON object, got list\n"
        f"  {evals}:2: field 'instruction' must be a string, got number")
    assert not any((tmp_path / "cache" / "data").iterdir())  # data with problems is never cached


def entry_of(section, tokenizer, limit=256) -> Path:
    return datastore.cache_root() / datastore.cache_key(section, limit, tokenizer)[0]


@pytest.fixture
def cached(tokenizer, tmp_path, monkeypatch):
    """A data file encoded once into a fresh cache; returns (section, data path)."""
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "t.jsonl", term_rows())
    section = DataSection(train=str(path))
    store = datastore.prepare_data(section, tokenizer, 256)
    assert not store.hit and store.note.startswith("encoded now: 12 rows in ")
    return section, path


def refuse_encoding(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("encoded again although the cache had the entry")

    monkeypatch.setattr(datastore, "encode_to", fail)


def test_the_same_data_again_comes_from_the_cache_without_encoding(tokenizer, cached, monkeypatch):
    section, _ = cached
    refuse_encoding(monkeypatch)
    store = datastore.prepare_data(section, tokenizer, 256)
    assert store.hit and store.note.startswith("from the cache (entry ")
    assert ": 12 rows, checked and opened in " in store.note
    train, _ = datastore.split_encodings(store, section, 0)
    assert digest(train.examples) == digest(encode.encode_rows(reading.parse_rows(Path(section.train), section)[0],
                                                             section, tokenizer, 256).examples)
    # num_proc changes how fast, not what: still the same entry
    assert datastore.prepare_data(section.model_copy(update={"num_proc": 3}), tokenizer, 256).hit


def changed_tokenizer(tokenizer):
    import copy

    other = copy.deepcopy(tokenizer)
    other.chat_template = tokenizer.chat_template.replace("Today Date", "Date")
    return other


@pytest.mark.parametrize("change", ["file content", "data section", "max_seq_length", "tokenizer",
                                    "encoder version"])
def test_every_key_change_encodes_again(tokenizer, cached, change, monkeypatch):
    section, path = cached
    limit = 256
    if change == "file content":
        with path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"instruction": "새 행", "output": "새 답"}, ensure_ascii=False) + "\n")
    elif change == "data section":
        section = section.model_copy(update={"system_prompt": "건설 도우미"})
    elif change == "max_seq_length":
        limit = 255
    elif change == "tokenizer":
        tokenizer = changed_tokenizer(tokenizer)
    else:
        monkeypatch.setattr(datastore, "ENCODER_VERSION", datastore.ENCODER_VERSION + 1)
    store = datastore.prepare_data(section, tokenizer, limit)
    assert not store.hit
    train, _ = datastore.split_encodings(store, section, 0)
    rows, _ = reading.parse_rows(path, section)
    assert digest(train.examples) == digest(encode.encode_rows(rows, section, tokenizer, limit).examples)
    assert datastore.prepare_data(section, tokenizer, limit).hit  # and the new entry is used next time


@pytest.mark.parametrize("damage", ["truncated arrow", "flipped byte", "no entry file", "torn entry file"])
def test_a_damaged_cache_entry_is_never_used(tokenizer, cached, damage):
    section, path = cached
    folder = entry_of(section, tokenizer)
    arrow = folder / "train.arrow"
    if damage == "truncated arrow":
        os.truncate(arrow, arrow.stat().st_size // 2)
    elif damage == "flipped byte":
        raw = bytearray(arrow.read_bytes())
        position = raw.index("거푸집".encode())  # inside a row's text: still readable Arrow, wrong content
        raw[position + 2] ^= 1
        arrow.write_bytes(bytes(raw))
    elif damage == "no entry file":
        (folder / "entry.json").unlink()
    else:
        text = (folder / "entry.json").read_text(encoding="utf-8")
        (folder / "entry.json").write_text(text[: len(text) // 2], encoding="utf-8")
    store = datastore.prepare_data(section, tokenizer, 256)
    assert not store.hit and "was damaged" in store.note
    train, _ = datastore.split_encodings(store, section, 0)
    rows, _ = reading.parse_rows(path, section)
    assert digest(train.examples) == digest(encode.encode_rows(rows, section, tokenizer, 256).examples)
    assert datastore.entry_problem(folder) is None  # replaced by a good entry
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no scratch or damaged folder left


def test_an_entry_whose_images_changed_is_not_used(tokenizer, tmp_path, monkeypatch, image_data):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    section = DataSection(train=image_data["mixed"])
    assert not datastore.prepare_data(section, tokenizer, 4096).hit
    assert datastore.prepare_data(section, tokenizer, 4096).hit
    image = Path(json.loads(Path(image_data["mixed"]).read_text().splitlines()[0])["image"])
    image = image if image.is_absolute() else Path(image_data["mixed"]).parent / image
    stat = image.stat()
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    store = datastore.prepare_data(section, tokenizer, 4096)
    assert not store.hit and "an image file changed" in store.note


def test_a_partial_folder_is_never_read_as_an_entry(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "t.jsonl", term_rows())
    section = DataSection(train=str(path))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(datastore, "install", crash)
    with pytest.raises(KeyboardInterrupt):
        datastore.prepare_data(section, tokenizer, 256)
    assert list((tmp_path / "cache" / "data").iterdir()) == []  # nothing half-written stays behind
    monkeypatch.undo()
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    assert not datastore.prepare_data(section, tokenizer, 256).hit


def test_eval_reads_the_held_out_rows_from_the_cache_training_filled(tmp_path, tiny_data, monkeypatch):
    from toolkit.config.recipe import load_recipe
    from toolkit.training.prepare import held_out_rows, prepare

    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    path = tiny_recipe(tmp_path, {"train": tiny_data["train"]})
    recipe = load_recipe(str(path), ["data.eval_fraction=0.25"])
    prepare(recipe)
    refuse_encoding(monkeypatch)
    rows = held_out_rows(recipe)
    assert len(rows) == 3 and rows == reading.load_splits(recipe.data, recipe.train.seed)[1]


def test_the_training_dataset_holds_the_kept_rows_in_the_given_order_with_trl_labels(tokenizer, tmp_path,
                                                                                     monkeypatch):
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    path = write_jsonl(tmp_path / "t.jsonl", term_rows())
    section = DataSection(train=str(path))
    _, (train, _) = stored(section, tokenizer, limit=44)  # half the rows are cut, half dropped
    examples = list(train.examples)
    order = [5, 0, 3, 3, 1]
    dataset = train.dataset(order)
    assert len(examples) == 6 and dataset.column_names == ["input_ids", "completion_mask", "labels"]
    for i, item in zip(order, dataset):
        assert item["input_ids"] == examples[i].input_ids and item["completion_mask"] == examples[i].completion_mask
        # what TRL builds from completion_mask: the id where the loss applies, -100 elsewhere
        assert item["labels"] == [t if m else -100 for t, m in zip(examples[i].input_ids, examples[i].completion_mask)]
    assert list(train.trained_lengths) == [44] * 6


def test_content_hash_follows_the_bytes_of_a_file_or_of_every_file_in_a_saved_dataset(tmp_path):
    from toolkit.data.sources import content_hash

    one = write_jsonl(tmp_path / "a.jsonl", term_rows())
    two = write_jsonl(tmp_path / "b.jsonl", term_rows())
    assert content_hash(one) == content_hash(two)  # the name does not matter, the content does
    os.utime(two, ns=(0, 0))
    assert content_hash(one) == content_hash(two)
    two.write_text(two.read_text(encoding="utf-8").replace("철근", "철골"), encoding="utf-8")
    assert content_hash(one) != content_hash(two)
    folder = tmp_path / "saved"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "x.arrow").write_bytes(b"ab")
    (folder / "y.json").write_bytes(b"c")
    before = content_hash(folder)
    (folder / "y.json").write_bytes(b"d")
    assert content_hash(folder) != before
    (folder / "y.json").write_bytes(b"c")
    assert content_hash(folder) == before
    (folder / "sub" / "x.arrow").rename(folder / "sub" / "z.arrow")  # a renamed file inside is a change
    assert content_hash(folder) != before


def test_rows_of_different_shapes_in_one_chunk_each_get_their_own_template(tokenizer, tmp_path, monkeypatch,
                                                                            image_data):
    # image rows and text rows both have two texts (question, answer) but render different templates
    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    path = Path(image_data["mixed"])
    section = DataSection(train=str(path), num_proc=1)
    _, (train, _) = stored(section, tokenizer, limit=4096)
    reference = one_by_one(path, section, tokenizer, limit=4096)
    image_id = tokenizer.convert_tokens_to_ids("<|image|>")
    assert [e.input_ids.count(image_id) for e in train.examples] == [1] * 6 + [0] * 12
    assert [(e.input_ids, e.completion_mask, e.images) for e in train.examples] == \
        [(e.input_ids, e.completion_mask, e.images) for e in reference]


def test_lora_targets_are_checked_once_per_config_lora_and_quantization(tmp_path, monkeypatch):
    from toolkit.config.recipe import load_recipe
    from toolkit.training import prepare as prepare_module

    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe(str(ROOT / "recipes" / "quickstart.yaml"), [])
    def config():  # as each command loads it (building the meta model adds settings to the config it is given)
        return loading.load_config(recipe.model.name)

    built = []
    real_meta = loading.meta_model
    monkeypatch.setattr(loading, "meta_model", lambda c: built.append(1) or real_meta(c))
    first = prepare_module.lora_targets(recipe, config())
    assert len(first) == 29 and len(built) == 1
    assert prepare_module.lora_targets(recipe, config()) == first and len(built) == 1  # remembered
    narrower = recipe.model_copy(update={"lora": recipe.lora.model_copy(update={"targets": ["q_proj"]})})
    assert len(prepare_module.lora_targets(narrower, config())) == 4 and len(built) == 2  # another key
    kept = next((tmp_path / "cache" / "lora-targets").glob("*.json"))
    for damaged in ("{", json.dumps({"key": "other", "modules": ["x"]}), json.dumps({"key": kept.stem, "modules": []})):
        for path in (tmp_path / "cache" / "lora-targets").glob("*.json"):
            path.write_text(damaged, encoding="utf-8")
        built.clear()
        assert prepare_module.lora_targets(recipe, config()) == first and len(built) == 1  # checked again
    bad = recipe.model_copy(update={"lora": recipe.lora.model_copy(update={"targets": ["no_such_proj"]})})
    with pytest.raises(ToolkitError):
        prepare_module.lora_targets(bad, config())
    with pytest.raises(ToolkitError):  # a refusal is never remembered
        prepare_module.lora_targets(bad, config())
