"""Data checks: every problem reported at once with file:line and field, before any model loads."""

from __future__ import annotations

import json

from conftest import term_rows, tiny_recipe, write_jsonl

from toolkit.cli import main
from toolkit.config.recipe import DataSection
from toolkit.data.encode import percentiles
from toolkit.data.reading import parse_rows, split_rows

ALPACA = DataSection(train="t.jsonl")


def test_every_problem_is_reported_with_its_line(tmp_path):
    lines = [
        b'{"instruction": "a", "input": "", "output": "ok"}',
        b'{"instruction": "a", "output": 42}',
        b'{"instruction": "a", "output": null}',
        b"not json",
        b"[1, 2]",
        b'{"output": "x"}',
        b'{"instruction": "\xff\xfe", "output": "x"}',
        b'{"instruction": "a", "input": 3, "output": "x", "terms": "x"}',
    ]
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    rows, problems = parse_rows(path, ALPACA)
    assert [r.line for r in rows] == [1]
    assert problems == [
        f"{path}:2: field 'output' must be a string, got number",
        f"{path}:3: field 'output' must be a string, got null",
        f"{path}:4: invalid JSON (Expecting value at column 1)",
        f"{path}:5: expected a JSON object, got list",
        f"{path}:6: missing field 'instruction'",
        f"{path}:7: not valid UTF-8 (byte 18 of the line)",
        f"{path}:8: field 'input' must be a string, got number",
        f"{path}:8: field 'terms' must be a list of non-empty strings",
    ]


def test_bom_crlf_and_blank_lines_are_fine(tmp_path):
    row = json.dumps({"instruction": "다음 용어를 설명하세요.", "input": "양생", "output": "양생은 ..."}, ensure_ascii=False)
    path = tmp_path / "ok.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + row.encode() + b"\r\n\r\n  \n" + row.encode() + b"\r\n")
    rows, problems = parse_rows(path, ALPACA)
    assert problems == []
    assert [r.line for r in rows] == [1, 4]
    assert rows[0].fields["input"] == "양생"


def test_empty_file_is_a_problem(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n", encoding="utf-8")
    assert parse_rows(path, ALPACA)[1] == [f"{path}: no rows (the file is empty)"]


def test_bad_data_exits_2_and_leaves_no_run_directory(tmp_path, tiny_data, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", term_rows() + [{"instruction": "x", "output": 7}])
    recipe = tiny_recipe(tmp_path, {"train": str(bad), "eval": tiny_data["eval"]})
    run_dir = tmp_path / "run"
    assert main(["sft", str(recipe), "--output-dir", str(run_dir)]) == 2
    assert not run_dir.exists()
    out = capsys.readouterr().out
    assert f"{bad}:13: field 'output' must be a string, got number" in out.replace("\n", "")
    assert "Traceback" not in out


def test_missing_data_file_is_one_clear_error(tmp_path, tiny_data, capsys):
    recipe = tiny_recipe(tmp_path, {"train": str(tmp_path / "nope.jsonl"), "eval": tiny_data["eval"]})
    assert main(["validate", str(recipe)]) == 2
    assert "data.train: file not found" in capsys.readouterr().out


def test_hold_out_split_is_deterministic(tmp_path):
    rows, _ = parse_rows(write_jsonl(tmp_path / "t.jsonl", term_rows()), ALPACA)
    train_a, eval_a = split_rows(rows, 0.25, seed=1)
    train_b, eval_b = split_rows(rows, 0.25, seed=1)
    assert [r.line for r in eval_a] == [r.line for r in eval_b]
    assert len(eval_a) == 3 and len(train_a) == 9
    assert {r.line for r in train_a}.isdisjoint(r.line for r in eval_a)


def encode_term_rows(limit: int, too_long: str = "truncate"):
    from toolkit.config.recipe import DataSection
    from toolkit.data.encode import encode_rows
    from toolkit.data.reading import Row
    from toolkit.model import loading

    rows = [Row("t.jsonl", i + 1, fields) for i, fields in enumerate(term_rows())]
    tokenizer = loading.load_tokenizer("builtin:tiny-mllama")
    return encode_rows(rows, DataSection(train="t.jsonl", too_long=too_long), tokenizer, limit)


def test_rows_cut_by_the_limit_are_counted_and_rows_left_without_an_answer_dropped():
    # The 12 rows are 52-61 tokens; answers start at token 41-42 for one wording and 45-46 for the other.
    cut = encode_term_rows(limit=44)
    assert (len(cut.rows), cut.truncated, cut.dropped_empty, cut.dropped_long) == (6, 6, 6, 0)
    assert all(len(e.input_ids) == 44 and e.learned > 0 for e in cut.examples)
    assert [r.line for r in cut.rows] == [1, 3, 5, 7, 9, 11]
    dropped = encode_term_rows(limit=56, too_long="drop")
    assert (len(dropped.rows), dropped.dropped_long, dropped.truncated) == (6, 6, 0)
    assert all(len(e.input_ids) <= 56 for e in dropped.examples)
    assert percentiles([10, 20, 30, 40]) == {"p50": 20, "p90": 40, "p99": 40, "p100": 40}


def test_training_reports_the_rows_it_really_trained(tmp_path, tiny_data, capsys):
    recipe = tiny_recipe(tmp_path, {"train": tiny_data["train"]},
                         train={"max_seq_length": 44, "epochs": 1, "max_steps": None, "batch_size": 4})
    run_dir = tmp_path / "run"
    assert main(["sft", str(recipe), "--output-dir", str(run_dir)]) == 0
    out = capsys.readouterr().out.replace("\n", "")
    assert "6 of 12" in out and "12 over 44, 6 cut to 44, 6 dropped (no answer token left after the cut)" in out
    summary = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))["summary"]
    assert (summary["train_rows"], summary["train_rows_read"], summary["train_rows_cut"],
            summary["train_rows_dropped"], summary["steps"]) == (6, 12, 6, 6, 2)


def test_a_limit_that_leaves_no_row_is_an_error_before_training(tmp_path, tiny_data, capsys):
    recipe = tiny_recipe(tmp_path, tiny_data, train={"max_seq_length": 40})
    assert main(["validate", str(recipe)]) == 2
    assert "data.train: all 12 rows were dropped by train.max_seq_length=40" in capsys.readouterr().out
    assert main(["validate", str(recipe), "--set", "train.max_seq_length=1"]) == 2
    assert "train.max_seq_length: Input should be greater than or equal to 8" in capsys.readouterr().out


def test_hostile_json_is_a_problem_with_its_line_never_a_crash(tmp_path):
    lines = [
        "[" * 100_000 + "]" * 100_000,
        '{"instruction": "a", "output": ' + "9" * 5000 + "}",
        '{"instruction": "\\ud800", "output": "x"}',
        '{"instruction": "a", "output": "b"}',
    ]
    path = tmp_path / "hostile.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows, problems = parse_rows(path, ALPACA)
    assert [r.line for r in rows] == [4]
    assert problems[0] == f"{path}:1: invalid JSON (nested too deeply)"
    assert problems[1].startswith(f"{path}:2: invalid JSON (Exceeds the limit")
    assert problems[2] == f"{path}:3: invalid text (a lone surrogate escape such as \\ud800, which is not a character)"


def test_a_glossary_that_is_not_utf8_is_one_line(tmp_path):
    from toolkit.data.reading import read_glossary
    from toolkit.errors import ToolkitError

    path = tmp_path / "glossary.txt"
    path.write_bytes("거푸집\n".encode("cp949"))
    try:
        read_glossary(str(path))
    except ToolkitError as err:
        assert str(err) == f"data.glossary {path}: not UTF-8 text (byte 1); save it as UTF-8"
    else:
        raise AssertionError("a cp949 glossary was read as UTF-8")
