"""Hostile input, generated: any bytes, JSON values and strings given to the recipe loader, `--set`, the data reader
and the alpaca formatter + encoder end in a result or a `ToolkitError` (reported problems for data), never in
another exception; and every row the reader accepts encodes with exactly the template's special tokens, none made
from data text."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from toolkit.config.recipe import DataSection, Recipe, load_recipe
from toolkit.data import encode, reading, sources
from toolkit.errors import ToolkitError
from toolkit.model import loading

# Derandomized: CI sees the same examples on every run; deadline off: the first call pays for imports.
FAST = settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
SPECIAL_TEXT = ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|begin_of_text|>", "<|image|>",
                "<|reserved_special_token_3|>", "<|eom_id|>", "\ue000", "\ue0010\ue001", "\n\n", "assistant"]
RECIPE_KEYS = ["model", "name", "data", "train", "eval", "lora", "targets", "quantization", "mode", "max_steps",
               "learning_rate", "seed", "skip_modules", "output_dir", "formatter", "r", "alpha", "scope"]

texts = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(SPECIAL_TEXT)), max_size=5).map("".join)
scalars = st.none() | st.booleans() | st.integers() | st.floats() | texts
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.sampled_from(RECIPE_KEYS) | texts, inner, max_size=4), max_leaves=16)
answers = texts.map("x{}".format) | texts  # mostly accepted, sometimes empty or blank
alpaca_rows = st.fixed_dictionaries(
    {"instruction": answers, "output": answers},
    optional={"input": texts | scalars, "terms": st.lists(texts, max_size=3) | json_values, "extra": json_values},
)


def scratch_file(content: bytes, suffix: str) -> Path:
    """A file for one generated example (hypothesis runs many examples per test, so no tmp_path fixture)."""
    handle = tempfile.NamedTemporaryFile(suffix=suffix, delete=False)
    handle.write(content)
    handle.close()
    return Path(handle.name)


def loads_or_refuses(path: Path, overrides: list[str]) -> None:
    try:
        assert isinstance(load_recipe(path, overrides), Recipe)
    except ToolkitError as err:
        assert str(err)


@FAST
@given(st.binary(max_size=300))
def test_any_bytes_as_a_recipe(content):
    path = scratch_file(content, ".yaml")
    try:
        loads_or_refuses(path, [])
    finally:
        path.unlink()


@FAST
@given(json_values)
def test_any_yaml_value_as_a_recipe(value):
    path = scratch_file(yaml.safe_dump(value, allow_unicode=True).encode("utf-8"), ".yaml")
    try:
        loads_or_refuses(path, [])
    finally:
        path.unlink()


@functools.cache
def minimal_recipe() -> Path:
    return scratch_file(b"model: {name: builtin:tiny-mllama}\ndata: {train: t.jsonl}\n", ".yaml")


@FAST
@given(st.text(max_size=60) | st.builds("{}={}".format, st.lists(st.sampled_from(RECIPE_KEYS), min_size=1,
                                                                 max_size=3).map(".".join), texts))
def test_any_set_override(override):
    loads_or_refuses(minimal_recipe(), [override])


def section() -> DataSection:
    return DataSection(train="t.jsonl")


def read_back(content: bytes) -> tuple[list[reading.Row], list[str]]:
    """The rows the reader accepts and the problems it reports; both readers must return, never raise."""
    path = scratch_file(content, ".jsonl")
    try:
        records, record_problems = sources.read_records(path)
        assert all(isinstance(n, int) and str(path) in message for n, message in record_problems)
        rows, problems = reading.parse_rows(path, section())
        assert all(isinstance(p, str) and str(path) in p for p in problems)
        assert len(rows) <= len(records)
        return rows, problems
    finally:
        path.unlink()


@FAST
@given(st.binary(max_size=400))
def test_any_bytes_as_a_data_file(content):
    read_back(content)


@FAST
@given(st.lists(json_values | alpaca_rows, max_size=4), st.booleans())
def test_any_json_values_as_data_lines(values, ascii_only):
    lines = [json.dumps(v, ensure_ascii=ascii_only) for v in values]
    rows, problems = read_back("\n".join(lines).encode("utf-8", "surrogatepass"))
    for row in rows:
        assert isinstance(row.fields["instruction"], str) and row.fields["instruction"].strip()
        assert isinstance(row.fields["output"], str) and row.fields["output"].strip()


@functools.cache
def tokenizer_and_template():
    """The built-in tokenizer, its special token ids, and the special ids of a plain alpaca row: the template's."""
    tokenizer = loading.load_tokenizer("builtin:tiny-mllama")
    specials = set(tokenizer.convert_tokens_to_ids(encode.special_token_texts(tokenizer)))
    plain = encode.encode_rows([reading.Row("t.jsonl", 1, {"instruction": "a", "output": "b"})], section(), tokenizer,
                             4096).examples[0]
    return tokenizer, specials, [t for t in plain.input_ids if t in specials]


@settings(FAST, max_examples=60)
@given(st.lists(alpaca_rows, min_size=1, max_size=3))
def test_accepted_rows_encode_with_only_the_templates_special_tokens(rows):
    accepted, _ = read_back("\n".join(json.dumps(r) for r in rows).encode("utf-8", "surrogatepass"))
    tokenizer, specials, template = tokenizer_and_template()
    encoding = encode.encode_rows(accepted, section(), tokenizer, 4096)
    assert len(encoding.examples) == len(accepted)
    for example in encoding.examples:
        assert [t for t in example.input_ids if t in specials] == template
        assert example.learned > 0
