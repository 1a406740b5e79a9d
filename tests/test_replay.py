"""`data.replay`: general rows mixed into training (toolkit/data/replay.py), on the built-in model. Whether replay keeps a
real model's general answers is tested in test_real_model.py."""

from __future__ import annotations

import json

import pytest
import yaml
from conftest import tiny_recipe, write_jsonl

from toolkit.cli import main
from toolkit.config.recipe import load_recipe
from toolkit.data import encode, reading, replay
from toolkit.model import loading
from toolkit.training.prepare import prepare


def recipe_file(folder, files, data_changes: dict, **sections):
    """tiny_recipe with keys of its data section changed (its `data` argument names the files)."""
    path = tiny_recipe(folder, files, **sections)
    recipe = yaml.safe_load(path.read_text(encoding="utf-8"))
    recipe["data"].update(data_changes)
    path.write_text(yaml.safe_dump(recipe, allow_unicode=True), encoding="utf-8")
    return path


def shipped_rows() -> list[dict]:
    return [json.loads(line) for line in replay.shipped_set().read_text(encoding="utf-8").splitlines()]


def general_of(prepared) -> list[tuple[str, int]]:
    """(source, line) of the training rows that came from replay."""
    return [(row.source, row.line) for row in prepared.train.rows if row.source != prepared.recipe.data.train]


def test_share_is_the_share_of_general_rows_in_the_mix():
    assert [replay.replay_count(s, 90) for s in (0.0, 0.1, 0.25, 0.5, 0.9)] == [0, 10, 30, 90, 810]
    assert replay.replay_count(0.25, 0) == 0


def test_no_replay_by_default(tmp_path, tiny_data):
    prepared = prepare(load_recipe(tiny_recipe(tmp_path, tiny_data)))
    assert prepared.replay is None and general_of(prepared) == [] and len(prepared.train.rows) == 12


def test_shipped_rows_are_mixed_in_encoded_like_domain_rows(tmp_path, tiny_data):
    recipe = load_recipe(recipe_file(tmp_path, tiny_data, {"replay": {"share": 0.25},
                                                                "system_prompt": "Answer briefly."}))
    prepared = prepare(recipe)
    general = general_of(prepared)
    assert len(prepared.train.rows) == 16 and len(general) == 4  # 4 of 16 = 0.25
    assert {source for source, _ in general} == {str(replay.shipped_set())}
    assert prepared.replay == replay.Replay("the shipped general set", 4, 4, 0.25)
    assert len(prepared.eval.rows) == 6  # eval rows are never mixed
    tokenizer = loading.load_tokenizer("builtin:tiny-mllama")
    shipped = shipped_rows()
    for row, example in list(zip(prepared.train.rows, prepared.train.examples))[12:]:
        fields = shipped[row.line - 1]
        messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": fields["instruction"]},
                    {"role": "assistant", "content": fields["output"]}]
        assert example == encode.encode_conversation(messages, tokenizer, recipe.data.date_string)


def test_draw_is_fixed_by_the_seed_and_goes_round_the_set_again(tmp_path, tiny_data):
    def drawn(seed, share):
        recipe = load_recipe(recipe_file(tmp_path, tiny_data, {"replay": {"share": share}},
                                         train={"seed": seed}))
        return general_of(prepare(recipe))

    first = drawn(1, 0.5)
    assert first == drawn(1, 0.5) and first != drawn(2, 0.5) and len(first) == 12 == len(set(first))
    many = drawn(1, 0.9)  # 108 rows from a set of 51: every row at least twice, none more than three times
    counts = {row: many.count(row) for row in set(many)}
    assert len(many) == 108 and len(counts) == len(shipped_rows()) and set(counts.values()) <= {2, 3}


def test_a_users_general_file_is_read_with_the_recipes_formatter(tmp_path, tiny_data):
    rows = [{"messages": [{"role": "user", "content": f"Say {word}."}, {"role": "assistant", "content": word}]}
            for word in ("one", "two", "three")]
    own = write_jsonl(tmp_path / "general.jsonl", rows)
    train = write_jsonl(tmp_path / "train.jsonl", [{"messages": [{"role": "user", "content": "Q"},
                                                                 {"role": "assistant", "content": "A"}]}] * 6)
    recipe = load_recipe(recipe_file(tmp_path, {"train": str(train)}, {
        "formatter": "messages", "replay": {"share": 0.5, "data": str(own)}}))
    prepared = prepare(recipe)
    assert sorted(general_of(prepared)) == [(str(own), n) for n in (1, 1, 2, 2, 3, 3)]
    assert prepared.replay == replay.Replay(str(own), 6, 3, 0.5)


def test_validate_shows_the_replay_rows(tmp_path, tiny_data, capsys):
    assert main(["validate", str(recipe_file(tmp_path, tiny_data, {"replay": {"share": 0.5}}))]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "replay │ 12 general rows (12 different) from the shipped general set: 50% of train rows" in out
    assert "train rows │ 24 of 24" in out


@pytest.mark.parametrize("replay_section, message", [
    ({"share": 0.95}, "data.replay.share: Input should be less than or equal to 0.9"),
    ({"share": 0.2, "data": " "}, "data.replay.data: name a data file, or leave replay.data out for the shipped "
                                  "general set"),
    ({"shares": 0.2}, "data.replay.shares: unknown key (did you mean 'share'?); valid keys here: share, data"),
])
def test_bad_replay_settings_are_refused_before_anything_loads(tmp_path, tiny_data, capsys, replay_section,
                                                                message):
    assert main(["validate", str(recipe_file(tmp_path, tiny_data, {"replay": replay_section}))]) == 2
    assert message in " ".join(capsys.readouterr().out.split())


def test_a_missing_or_empty_general_file_is_refused(tmp_path, tiny_data, capsys):
    missing = tmp_path / "nope.jsonl"
    assert main(["validate", str(recipe_file(tmp_path, tiny_data, {
        "replay": {"share": 0.2, "data": str(missing)}}))]) == 2
    assert f"data.replay.data: file not found: {missing}" in " ".join(capsys.readouterr().out.split())
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    assert main(["validate", str(recipe_file(tmp_path, tiny_data, {
        "replay": {"share": 0.2, "data": str(empty)}}))]) == 2
    assert f"data.replay.data: 1 problem(s): {empty}: no rows (the file is empty)" in " ".join(capsys.readouterr().out.split())
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "Q"}])
    assert main(["validate", str(recipe_file(tmp_path, tiny_data, {
        "replay": {"share": 0.2, "data": str(bad)}}))]) == 2
    assert f"data.replay.data: 1 problem(s): {bad}:1: " in " ".join(capsys.readouterr().out.split())


def test_shipped_general_set_is_well_formed_and_short():
    rows = shipped_rows()
    assert len(rows) == 51 and all(set(r) == {"instruction", "output"} for r in rows)
    assert len({r["instruction"] for r in rows}) == 51
    section = load_recipe_section()
    parsed, problems = reading.parse_rows(replay.shipped_set(), section)
    assert problems == [] and len(parsed) == 51


def load_recipe_section():
    from toolkit.config.recipe import DataSection

    return DataSection(train="unused.jsonl")


def test_no_replay_question_is_a_question_of_the_retention_set():
    """Replay must not train on what `eval --retention` asks, or the drift it shrinks would be measured on
    questions it was taught."""
    from toolkit.evaluation import retention, terms

    lines = retention.shipped_set().read_text(encoding="utf-8").splitlines()
    asked = {terms.normalize(json.loads(line)["instruction"]) for line in lines if line.strip()}
    assert len(asked) > 200
    assert [r["instruction"] for r in shipped_rows() if terms.normalize(r["instruction"]) in asked] == []
