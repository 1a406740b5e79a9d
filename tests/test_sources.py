"""Data files of every type (JSON Lines, JSON array, CSV, Parquet, a save_to_disk folder) become the same rows, and
every way a file can be broken is one problem line naming the file and the row."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import tiny_recipe, write_jsonl

from toolkit.cli import main
from toolkit.config.recipe import DataSection
from toolkit.data import sources
from toolkit.data.encode import encode_rows
from toolkit.data.reading import parse_rows

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "data" / "samples"
ALPACA = DataSection(train="rows.jsonl")
FIELDS = ("instruction", "input", "output")


def construction_rows(n: int = 20) -> list[dict]:
    lines = (REPO / "data" / "construction_terms.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines[:n]]


def write_json_array(path: Path, rows: list, indent: int | None = 2) -> Path:
    path.write_text(json.dumps(rows, ensure_ascii=False, indent=indent), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict], columns=FIELDS) -> Path:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows([[row.get(name) for name in columns] for row in rows])
    return path


def write_parquet(path: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = list(dict.fromkeys(key for row in rows for key in row))  # every row's keys; a row without one: null
    pq.write_table(pa.table({key: [row.get(key) for row in rows] for key in columns}), path)
    return path


def write_saved(path: Path, rows: list[dict]) -> Path:
    import datasets

    datasets.disable_progress_bars()
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def every_type(folder: Path, rows: list[dict]) -> dict[str, Path]:
    """The same rows in each file type (CSV without `terms`: a cell cannot hold a list)."""
    return {
        "jsonl": write_jsonl(folder / "rows.jsonl", rows),
        "json": write_json_array(folder / "rows.json", rows),
        "csv": write_csv(folder / "rows.csv", rows),
        "parquet": write_parquet(folder / "rows.parquet", rows),
        "saved": write_saved(folder / "rows_saved", rows),
    }


def read(path: Path) -> tuple[list, list[str]]:
    return parse_rows(path, ALPACA)


def problems(path: Path) -> list[str]:
    return read(path)[1]


def test_the_same_20_construction_rows_train_to_identical_ids_and_masks_from_every_file_type(tmp_path):
    from toolkit.model import loading

    rows = construction_rows()
    tokenizer = loading.load_tokenizer("builtin:tiny-mllama")
    encoded = {}
    for kind, path in every_type(tmp_path, rows).items():
        parsed, found = read(path)
        assert found == [], kind
        assert [{k: r.fields.get(k) for k in FIELDS} for r in parsed] == [{k: r[k] for k in FIELDS} for r in rows]
        encoding = encode_rows(parsed, ALPACA, tokenizer, limit=512)
        encoded[kind] = [(e.input_ids, e.completion_mask) for e in encoding.examples]
    for formatter, path in chat_shaped(tmp_path, rows).items():
        section = DataSection(train=str(path), formatter=formatter)
        parsed, found = parse_rows(path, section)
        assert found == [], formatter
        encoded[formatter] = [(e.input_ids, e.completion_mask)
                              for e in encode_rows(parsed, section, tokenizer, limit=512).examples]
    assert len(encoded["jsonl"]) == 20 and all(sum(mask) > 0 for _, mask in encoded["jsonl"])
    assert set(encoded) == {"jsonl", "json", "csv", "parquet", "saved", "messages", "sharegpt"}
    for kind, examples in encoded.items():
        assert examples == encoded["jsonl"], kind


def chat_shaped(folder: Path, rows: list[dict]) -> dict[str, Path]:
    """The same rows as OpenAI-style `messages` JSON Lines and as a `sharegpt` JSON array."""
    def user(row):
        return f"{row['instruction']}\n\n{row['input']}" if row.get("input") else row["instruction"]

    messages = [{"messages": [{"role": "user", "content": user(r)}, {"role": "assistant", "content": r["output"]}]}
                for r in rows]
    sharegpt = [{"conversations": [{"from": "human", "value": user(r)}, {"from": "gpt", "value": r["output"]}]}
                for r in rows]
    return {"messages": write_jsonl(folder / "messages.jsonl", messages),
            "sharegpt": write_json_array(folder / "sharegpt.json", sharegpt)}


def test_an_empty_or_absent_optional_field_is_the_same_in_every_file_type(tmp_path):
    from toolkit.model import loading

    rows = [{"instruction": "레미콘을 설명하세요.", "output": "레미콘은 공장에서 배합한 콘크리트이다."},
            {"instruction": "양생을 설명하세요.", "input": "", "output": "양생은 콘크리트를 굳히는 일이다."}]
    tokenizer = loading.load_tokenizer("builtin:tiny-mllama")
    with_input = [{**rows[0], "input": ""}, rows[1]]
    paths = {**every_type(tmp_path, rows), "csv": write_csv(tmp_path / "empty_cell.csv", with_input)}
    encodings = {kind: encode_rows(read(path)[0], ALPACA, tokenizer, limit=512).examples for kind, path in paths.items()}
    assert read(paths["parquet"])[0][0].fields == rows[0]  # a Parquet null is an absent field, not None
    for kind, examples in encodings.items():
        assert [e.input_ids for e in examples] == [e.input_ids for e in encodings["jsonl"]], kind


def test_shipped_samples_hold_the_same_rows():
    kinds = {"alpaca.jsonl", "alpaca.json", "alpaca.csv", "alpaca.parquet", "alpaca_saved"}
    assert kinds <= {p.name for p in SAMPLES.iterdir()}
    reference, found = read(SAMPLES / "alpaca.jsonl")
    assert found == [] and len(reference) == 3
    for name in kinds:
        rows, found = read(SAMPLES / name)
        assert found == [], name
        assert [{k: r.fields.get(k) or "" for k in FIELDS} for r in rows] == \
            [{k: r.fields.get(k) or "" for k in FIELDS} for r in reference], name
        if name != "alpaca.csv":
            assert [r.fields["terms"] for r in rows] == [r.fields["terms"] for r in reference], name


def test_rows_are_named_by_line_or_by_row(tmp_path):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}]
    pretty = write_json_array(tmp_path / "pretty.json", rows)
    compact = write_json_array(tmp_path / "compact.json", rows, indent=None)
    table = write_csv(tmp_path / "multi.csv", [{"instruction": "two\nlines", "output": "x"}, rows[1]])
    parquet = write_parquet(tmp_path / "rows.parquet", rows)
    assert [r.where for r in read(pretty)[0]] == [f"{pretty}:2", f"{pretty}:6"]
    assert [r.where for r in read(compact)[0]] == [f"{compact} row 1", f"{compact} row 2"]
    assert [r.where for r in read(table)[0]] == [f"{table}:2", f"{table}:4"]  # a quoted line break spans lines
    assert [r.where for r in read(parquet)[0]] == [f"{parquet} row 1", f"{parquet} row 2"]


def test_broken_json_arrays_are_one_line_each(tmp_path):
    def json_file(name: str, text: str | bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return path

    cases = {
        json_file("object.json", '{"instruction": "a", "output": "b"}'):
            "{}:1: expected a JSON array of row objects ([{{...}}, {{...}}]), got an object; a file with one object "
            "per line is JSON Lines: name it .jsonl",
        json_file("comma.json", '[\n{"instruction": "a", "output": "b"},\n{"instruction": "c",}\n]'):
            "{}:3: invalid JSON (Expecting property name enclosed in double quotes at column 21)",
        json_file("missing.json", '[{"instruction": "a", "output": "b"} {"instruction": "c"}]'):
            "{}:1: invalid JSON (expected ',' or ']' after an array element)",
        json_file("trailing.json", '[{"instruction": "a", "output": "b"}]\n[]'):
            "{}:2: invalid JSON (more text after the array's closing ']')",
        json_file("empty.json", "  \n"): "{}: no rows (the file is empty)",
        json_file("none.json", "[ ]"): "{}: no rows (the array is empty)",
        json_file("latin1.json", b'[\n{"instruction": "caf\xe9", "output": "b"}]'):
            "{}:2: not valid UTF-8 (byte 21 of the line)",
        json_file("deep.json", "[" * 100_000 + "]" * 100_000): "{}:1: invalid JSON (nested too deeply)",
        json_file("surrogate.json", '[\n{"instruction": "\\ud800", "output": "b"}\n]'):
            "{}:2: invalid text (a lone surrogate escape such as \\ud800, which is not a character)",
    }
    for path, expected in cases.items():
        assert problems(path) == [expected.format(path)], path.name
    numbers = json_file("numbers.json", '[\n{"instruction": "a", "output": "b"},\n[1, 2]\n]')
    assert problems(numbers) == [f"{numbers}:3: expected a JSON object, got list"]


def test_broken_csv_files_are_one_line_each(tmp_path):
    def csv_file(name: str, text: str | bytes) -> Path:
        path = tmp_path / name
        path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
        return path

    header = csv_file("header.csv", "instruction,instruction, output ,,terms,messages\na,b,c,d,e,f\n")
    assert problems(header) == [
        f"{header}:1: column 'instruction' appears twice in the header",
        f"{header}:1: column name ' output ' has spaces around it; remove them",
        f"{header}:1: column 4 of the header has no name",
        f"{header}:1: column 'terms' cannot be used in CSV (a cell holds text, not a list); write these rows as "
        ".jsonl, .json or .parquet, or name a data.glossary",
        f"{header}:1: column 'messages' cannot be used in CSV (a cell holds text, not a list); write these rows as "
        ".jsonl, .json or .parquet",
    ]
    ragged = csv_file("ragged.csv", 'instruction,input,output\na,,b\nc,d\ne,f,g,h\n"x"y,z,w\n"open,1,2\n')
    assert problems(ragged) == [
        f"{ragged}:3: 2 cells, but the header names 3 columns (an empty cell still needs its comma)",
        f"{ragged}:4: 4 cells, but the header names 3 columns (a cell holding a comma must be in double quotes)",
        f"{ragged}:5: not valid CSV (',' expected after '\"'); a cell holding a comma, quote or line break must be "
        "in double quotes, with quotes inside written twice",
        f"{ragged}:6: not valid CSV (unexpected end of data); a cell holding a comma, quote or line break must be "
        "in double quotes, with quotes inside written twice",
    ]
    assert [r.line for r in read(ragged)[0]] == [2]
    korean = "instruction,output\n양생,양생은 콘크리트를 굳히는 일이다.\n".encode("cp949")
    cp949 = csv_file("cp949.csv", b"instruction,output\nok,fine\n" + korean.split(b"\n")[1] + b"\n")
    assert problems(cp949) == [f"{cp949}:3: column 'instruction' is not valid UTF-8; save the file as UTF-8"]
    only_header = csv_file("only_header.csv", "instruction,output\n\n")
    assert problems(only_header) == [f"{only_header}: no rows below the header line"]
    empty = csv_file("empty.csv", "")
    assert problems(empty) == [f"{empty}: no rows (the file is empty)"]
    bom = csv_file("bom.csv", "\ufeffinstruction,output\r\na,b\r\n")
    assert [r.fields for r in read(bom)[0]] == [{"instruction": "a", "output": "b"}]
    numbers = csv_file("numbers.csv", "instruction,output\n1,2\n")
    assert [r.fields for r in read(numbers)[0]] == [{"instruction": "1", "output": "2"}]  # cells stay text


def test_broken_parquet_and_folders_are_one_line_each(tmp_path):
    garbage = tmp_path / "garbage.parquet"
    garbage.write_bytes(b"PAR1 this is not a parquet file")
    assert problems(garbage) == [f"{garbage}: not a readable Parquet file (Parquet magic bytes not found in footer. "
                                 "Either the file is corrupted or this is not a parquet file.)"]
    empty = tmp_path / "empty.parquet"
    empty.write_bytes(b"")
    assert problems(empty) == [f"{empty}: not a readable Parquet file (Parquet file size is 0 bytes)"]
    import pyarrow as pa
    import pyarrow.parquet as pq

    no_rows = tmp_path / "no_rows.parquet"
    pq.write_table(pa.table({"instruction": pa.array([], pa.string())}), no_rows)
    assert problems(no_rows) == [f"{no_rows}: no rows (the file is empty)"]
    typed = write_parquet(tmp_path / "typed.parquet", [{"instruction": "a", "output": 7}])
    assert problems(typed) == [f"{typed} row 1: field 'output' must be a string, got number"]
    folder = tmp_path / "plain_folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("x", encoding="utf-8")
    assert problems(folder) == [f"{folder}: a folder, but not a dataset saved with datasets' save_to_disk (no "
                                "state.json); data files are .jsonl, .json, .csv, .parquet, or a folder saved with "
                                "datasets' save_to_disk"]
    import datasets

    datasets.disable_progress_bars()
    split = datasets.Dataset.from_list([{"instruction": "a", "output": "b"}])
    datasets.DatasetDict(train=split, test=split).save_to_disk(str(tmp_path / "splits"))
    assert problems(tmp_path / "splits") == [f"{tmp_path / 'splits'}: a dataset with several splits (train, test); "
                                             f"point at one split's folder, e.g. {tmp_path / 'splits' / 'train'}"]
    unknown = tmp_path / "rows.txt"
    unknown.write_text('{"instruction": "a", "output": "b"}\n', encoding="utf-8")
    assert problems(unknown) == [f"{unknown}: unknown data file type '.txt'; use .jsonl, .json, .csv, .parquet, or "
                                 "a folder saved with datasets' save_to_disk"]


def test_a_saved_dataset_with_a_damaged_arrow_file_is_one_line(tmp_path):
    saved = write_saved(tmp_path / "saved", [{"instruction": "a", "output": "b"}])
    arrow = next(saved.glob("*.arrow"))
    arrow.write_bytes(b"garbage")
    found = problems(saved)
    assert len(found) == 1 and found[0].startswith(f"{saved}: the saved dataset cannot be read (")


def test_jsonl_is_read_line_by_line(tmp_path, monkeypatch):
    """A large file is never read whole: the JSON Lines reader iterates the open file."""
    path = write_jsonl(tmp_path / "rows.jsonl", [{"instruction": "a", "output": "b"}] * 3)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail("read the whole file"))
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: pytest.fail("read the whole file"))
    assert len(read(path)[0]) == 3


def test_parquet_is_read_in_batches(tmp_path, monkeypatch):
    """Parquet rows come one Arrow batch at a time, never as one table of the whole file."""
    path = write_parquet(tmp_path / "rows.parquet", [{"instruction": f"q{i}", "output": "b"} for i in range(5)])
    monkeypatch.setattr(sources, "ARROW_BATCH_ROWS", 2)
    import pyarrow.parquet as pq

    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("read the whole table"))
    sizes = []
    original = sources.arrow_rows

    def counting(batches, where):
        return original((sizes.append(len(b)) or b for b in batches), where)

    monkeypatch.setattr(sources, "arrow_rows", counting)
    assert [r.fields["instruction"] for r in read(path)[0]] == [f"q{i}" for i in range(5)]
    assert sizes == [2, 2, 1]


def test_validate_and_eval_accept_every_file_type(tmp_path, tiny_data, tiny_run, capsys):
    rows = [json.loads(line) for line in Path(tiny_data["train"]).read_text(encoding="utf-8").splitlines()]
    train = write_parquet(tmp_path / "train.parquet", rows)
    evals = write_csv(tmp_path / "eval.csv", rows[:3])
    recipe = tiny_recipe(tmp_path, {"train": str(train), "eval": str(evals)})
    assert main(["validate", str(recipe)]) == 0
    assert "12 of 12" in capsys.readouterr().out
    saved = write_saved(tmp_path / "eval_saved", rows[:2])
    out = tmp_path / "eval.json"
    assert main(["eval", str(tiny_run), "--data", str(saved), "--max-new-tokens", "4", "--json", str(out)]) == 0
    assert json.loads(out.read_text(encoding="utf-8"))["n_examples"] == 2


def test_a_folder_is_accepted_where_a_data_file_is(tmp_path):
    saved = write_saved(tmp_path / "saved", [{"instruction": "a", "output": "b"}])
    assert sources.check_exists(str(saved), "data.train") == []
    assert sources.check_exists(str(tmp_path / "nope"), "data.train")[0].startswith("data.train: file not found: ")
