"""toolkit new-recipe: a recipe for a new domain in one command, never over a recipe it did not write."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from toolkit.cli import main
from toolkit.commands import new_recipe
from toolkit.config.recipe import load_recipe

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def workdir(tmp_path, tiny_data, monkeypatch):
    """A project folder holding the tiny data, and the shipped template pointed at the built-in model on CPU."""
    monkeypatch.chdir(tmp_path)
    for name in ("train", "eval"):
        (tmp_path / f"{name}.jsonl").write_bytes(Path(tiny_data[name]).read_bytes())
    shipped = new_recipe.template_text()
    cpu = shipped.replace("name: meta-llama/Llama-3.2-11B-Vision-Instruct", "name: builtin:tiny-mllama") \
        .replace("liger_kernel: true", "liger_kernel: false")
    assert cpu != shipped
    monkeypatch.setattr(new_recipe, "template_text", lambda: cpu)
    return tmp_path


def test_writes_a_recipe_that_validates_and_names_its_command(workdir, capsys):
    assert main(["new-recipe", "plumbing", "--train", "train.jsonl", "--eval", "eval.jsonl"]) == 0
    path = workdir / "recipes" / "plumbing.yaml"
    lines = path.read_text(encoding="utf-8").splitlines()
    assert lines[0] == "# toolkit sft recipes/plumbing.yaml"
    assert lines[1].startswith("# Written by toolkit new-recipe, so `toolkit new-recipe plumbing --overwrite` may")
    recipe = load_recipe(path)
    assert (recipe.data.train, recipe.data.eval, recipe.output_dir) == ("train.jsonl", "eval.jsonl", "runs/plumbing")
    out = capsys.readouterr().out
    assert "Wrote recipes/plumbing.yaml; checking it as toolkit validate does" in out
    assert "ok: recipes/plumbing.yaml is valid" in out and "Next: toolkit sft recipes/plumbing.yaml" in out
    assert [p.name for p in (workdir / "recipes").iterdir()] == ["plumbing.yaml"]  # no temporary file left


def test_without_eval_a_share_of_train_is_held_out(workdir):
    assert main(["new-recipe", "roads", "--train", "train.jsonl"]) == 0
    recipe = load_recipe(workdir / "recipes" / "roads.yaml")
    assert (recipe.data.eval, recipe.data.eval_fraction) == (None, new_recipe.EVAL_FRACTION)


def test_odd_file_names_read_back_exactly(workdir):
    odd = workdir / "rows #1: 'a'.jsonl"
    odd.write_bytes((workdir / "train.jsonl").read_bytes())
    assert main(["new-recipe", "odd", "--train", odd.name]) == 0
    assert load_recipe(workdir / "recipes" / "odd.yaml").data.train == odd.name


def test_never_replaces_a_recipe_without_overwrite_or_one_it_did_not_write(workdir, capsys):
    assert main(["new-recipe", "plumbing", "--train", "train.jsonl"]) == 0
    path = workdir / "recipes" / "plumbing.yaml"
    first = path.read_text(encoding="utf-8")
    capsys.readouterr()
    assert main(["new-recipe", "plumbing", "--train", "eval.jsonl"]) == 2
    assert ("error: recipes/plumbing.yaml already exists; pass --overwrite to replace it (only a recipe new-recipe "
            "wrote) or choose another NAME\n") in capsys.readouterr().out
    assert path.read_text(encoding="utf-8") == first
    assert main(["new-recipe", "plumbing", "--train", "eval.jsonl", "--overwrite"]) == 0
    assert load_recipe(path).data.train == "eval.jsonl"
    hand_made = "\n".join(line for line in path.read_text(encoding="utf-8").splitlines()
                          if not line.startswith(new_recipe.MARKER)) + "\n"
    path.write_text(hand_made, encoding="utf-8")
    capsys.readouterr()
    assert main(["new-recipe", "plumbing", "--train", "train.jsonl", "--overwrite"]) == 2
    assert ("error: recipes/plumbing.yaml was not written by toolkit new-recipe (no '# Written by toolkit new-recipe' "
            "line), so --overwrite leaves it alone; edit it yourself or choose another NAME\n") in capsys.readouterr().out
    assert path.read_text(encoding="utf-8") == hand_made


@pytest.mark.parametrize("name", ["../escape", "a/b", "a\\b", "", "-flag", "has space", "x" * 65, "bidi\u202e",
                                  ".hidden"])
def test_names_that_are_not_plain_file_names_are_refused(workdir, capsys, name):
    assert main(["new-recipe", "--train", "train.jsonl", "--", name]) == 2
    assert (f"error: NAME {name!r}: use 1-64 letters, digits, '-', '_' or '.', starting with a letter or digit (it "
            "becomes a file and folder name: no path separators or spaces), e.g. plumbing\n") in capsys.readouterr().out
    assert not (workdir / "recipes").exists() and not (workdir.parent / "escape.yaml").exists()


def test_help_lists_the_options(capsys):
    assert main(["new-recipe", "--help"]) == 0
    assert "held-out rows (default: hold out 10% of --train, data.eval_fraction)" in " ".join(
        capsys.readouterr().out.split())


def test_a_yaml_suffix_and_missing_data_are_refused_before_writing(workdir, capsys):
    assert main(["new-recipe", "plumbing.yaml", "--train", "train.jsonl"]) == 2
    assert "error: NAME 'plumbing.yaml': give the name without .yaml" in capsys.readouterr().out
    assert main(["new-recipe", "plumbing", "--train", "nope.jsonl"]) == 2
    assert (f"error: --train: file not found: nope.jsonl (relative paths are read from the current directory, "
            f"{workdir}); no recipe was written\n") in capsys.readouterr().out
    assert not (workdir / "recipes").exists()


def test_a_recipe_that_does_not_validate_stays_written_with_a_note(workdir, capsys):
    bad = workdir / "bad.jsonl"
    bad.write_text('{"instruction": "a", "output": 7}\n', encoding="utf-8")
    assert main(["new-recipe", "broken", "--train", "bad.jsonl"]) == 2
    out = capsys.readouterr().out
    assert ("recipes/broken.yaml is written but does not validate yet: fix what the next line says, then run toolkit "
            "validate recipes/broken.yaml\nerror: data: 1 problem(s):") in out
    assert f"{bad.name}:1: field 'output' must be a string, got number" in out
    assert (workdir / "recipes" / "broken.yaml").is_file()


def test_the_shipped_template_is_the_construction_recipe_with_new_data():
    """The template ships inside the package (recipes/ is not installed); it must keep the construction recipe's
    settings. When recipes/construction.yaml changes, update toolkit/assets/new_recipe.yaml with it."""
    filled = yaml.safe_load(new_recipe.fill(new_recipe.template_text(), "x", "t.jsonl", "e.jsonl"))
    construction = yaml.safe_load((REPO / "recipes" / "construction.yaml").read_text(encoding="utf-8"))
    for section in ("model", "quantization", "lora", "train"):
        assert filled[section] == construction[section], section
    assert filled["data"] == {"train": "t.jsonl", "eval": "e.jsonl", "formatter": construction["data"]["formatter"]}
    assert filled["output_dir"] == "runs/x"
