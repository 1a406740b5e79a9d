"""`toolkit new-recipe NAME --train F [--eval F]`: a recipe for a new domain in one command.

It writes `recipes/NAME.yaml` (under the current directory) from the construction recipe's settings, with the data
files and `output_dir: runs/NAME` filled in and the command that trains it as the first line, then runs every check
`toolkit validate` runs. The settings come from `toolkit/assets/new_recipe.yaml`, shipped inside the package: the
repository's `recipes/` folder is not installed with it and may be edited at any time. A test keeps the two equal.

A recipe file is never replaced unless it says new-recipe wrote it (its second line) and `--overwrite` is given, so
a recipe someone has edited by hand (and removed that line from) is safe.
"""

from __future__ import annotations

import argparse
import json
import re
from importlib import resources
from pathlib import Path

import yaml
from rich.markup import escape

from toolkit.config.recipe import recipe_from_dict
from toolkit.data import sources
from toolkit.errors import ToolkitError
from toolkit.io import files
from toolkit.ui.report import console

TEMPLATE = "assets/new_recipe.yaml"
MARKER = "# Written by toolkit new-recipe"  # the start of the template's second line
RECIPES_DIR = "recipes"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
EVAL_FRACTION = 0.1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="toolkit new-recipe", description="Write recipes/NAME.yaml for a new "
                                     "domain from the construction recipe, then validate it.")
    parser.add_argument("name", metavar="NAME", help="the domain's name: recipes/NAME.yaml, runs/NAME")
    parser.add_argument("--train", required=True, metavar="FILE", help="training rows (any data file type)")
    parser.add_argument("--eval", metavar="FILE",
                        help=f"held-out rows (default: hold out {EVAL_FRACTION:.0%}% of --train, data.eval_fraction)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace recipes/NAME.yaml if new-recipe wrote it (never a recipe without its line)")
    return parser


def check_name(name: str) -> None:
    if name.lower().endswith((".yaml", ".yml")):
        raise ToolkitError(f"NAME {name!r}: give the name without .yaml (recipes/NAME.yaml is made from it)")
    if not NAME.fullmatch(name):
        raise ToolkitError(f"NAME {name!r}: use 1-64 letters, digits, '-', '_' or '.', starting with a letter or "
                           "digit (it becomes a file and folder name: no path separators or spaces), e.g. plumbing")


def template_text() -> str:
    """The shipped template: the construction recipe's settings with NAME, TRAIN and EVAL to fill in."""
    return resources.files("toolkit").joinpath(TEMPLATE).read_text(encoding="utf-8")


def fill(template: str, name: str, train: str, eval_file: str | None) -> str:
    """The recipe text: each placeholder line replaced; paths as quoted YAML strings, so any file name reads back
    exactly (a `#`, `:` or leading space included)."""
    if eval_file is None:
        eval_line = f"  eval_fraction: {EVAL_FRACTION}  # no --eval file: hold out this share of train"
    else:
        eval_line = f"  eval: {json.dumps(eval_file, ensure_ascii=False)}"
    lines = {"  train: TRAIN": f"  train: {json.dumps(train, ensure_ascii=False)}", "  eval: EVAL": eval_line}
    text = "\n".join(lines.get(line, line) for line in template.split("\n"))
    return text.replace("recipes/NAME.yaml", f"recipes/{name}.yaml").replace("runs/NAME", f"runs/{name}") \
        .replace("new-recipe NAME", f"new-recipe {name}")


def written_by_us(path: Path) -> bool:
    """Whether the recipe at `path` carries new-recipe's line among its leading comments."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return False
    for line in lines:
        if not line.startswith("#"):
            return False  # past the leading comments
        if line.startswith(MARKER):
            return True
    return False


def check_target(path: Path, overwrite: bool) -> None:
    """Refuse to replace a recipe unless asked to and it is one new-recipe wrote."""
    if path.is_dir():
        raise ToolkitError(f"{path} is a folder; choose another NAME")
    if not path.exists() and not path.is_symlink():
        return
    if not overwrite:
        raise ToolkitError(f"{path} already exists; pass --overwrite to replace it (only a recipe new-recipe wrote) "
                           "or choose another NAME")
    if not written_by_us(path):
        raise ToolkitError(f"{path} was not written by toolkit new-recipe (no '{MARKER}' line), so --overwrite "
                           "leaves it alone; edit it yourself or choose another NAME")


def check_data(train: str, eval_file: str | None) -> None:
    """The data files must exist before a recipe points at them; their rows are checked by validate after."""
    problems = sources.check_exists(train, "--train") + (sources.check_exists(eval_file, "--eval") if eval_file
                                                           else [])
    if problems:
        raise ToolkitError(problems[0] + "; no recipe was written")


def write_recipe(name: str, train: str, eval_file: str | None, overwrite: bool) -> Path:
    """recipes/NAME.yaml, checked against the recipe schema before it is written (atomically)."""
    check_name(name)
    path = Path(RECIPES_DIR) / f"{name}.yaml"
    check_target(path, overwrite)
    check_data(train, eval_file)
    text = fill(template_text(), name, train, eval_file)
    recipe_from_dict(yaml.safe_load(text), source=str(path))
    if Path(RECIPES_DIR).exists() and not Path(RECIPES_DIR).is_dir():
        raise ToolkitError(f"{RECIPES_DIR} is a file, so recipes/{name}.yaml cannot be written here")
    Path(RECIPES_DIR).mkdir(exist_ok=True)
    files.write_text_atomic(path, text)
    return path


def main(argv: list[str]) -> int:
    from toolkit.commands import validate

    args = build_parser().parse_args(argv)
    path = write_recipe(args.name, args.train, args.eval, args.overwrite)
    console.print(f"Wrote [bold]{escape(str(path))}[/]; checking it as toolkit validate does", soft_wrap=True)
    try:
        validate.main([str(path)])
    except ToolkitError:
        console.print(f"{escape(str(path))} is written but does not validate yet: fix what the next line says, "
                      f"then run toolkit validate {escape(str(path))}", soft_wrap=True)
        raise
    console.print(f"Next: toolkit sft {escape(str(path))}", soft_wrap=True)
    return 0
