"""Argument helpers every command shares, so each option reads and fails the same way everywhere."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type for counts (--limit, --batch-size, ...): a clear message instead of a silent zero."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text}")
    return value


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """RECIPE and the repeatable `--set KEY=VALUE` overrides."""
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set train.max_steps=5 (repeatable)")


def add_run_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a finished run directory (from toolkit sft)")
