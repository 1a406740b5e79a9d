"""Argument helpers every command shares, so each option reads and fails the same way everywhere."""

from __future__ import annotations

import argparse
import math


def number(text: str, convert, lowest, exclusive: bool, what: str):
    """Read an option's value with `convert` and refuse NaN, infinities and values below `lowest` (or equal to it,
    when `exclusive`), with a message that says what was expected."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    unusable = isinstance(value, float) and not math.isfinite(value)
    if unusable or value < lowest or (exclusive and value == lowest):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
    return value


def positive_int(text: str) -> int:
    """argparse type for counts (--limit, --batch-size, ...): a clear message instead of a silent zero."""
    return number(text, int, 0, True, "a positive whole number")


def non_negative_int(text: str) -> int:
    """argparse type for counts where 0 means none (--show)."""
    return number(text, int, 0, False, "a whole number, 0 or more")


def positive_number(text: str) -> float:
    """argparse type for tolerances: NaN, infinities and numbers <= 0 would make a check meaningless."""
    return number(text, float, 0.0, True, "a positive number")


MAX_NEW_TOKENS = 8192


def answer_length(text: str) -> int:
    """argparse type for --max-new-tokens: positive and bounded, so a typo cannot start an endless generation."""
    value = positive_int(text)
    if value > MAX_NEW_TOKENS:
        raise argparse.ArgumentTypeError(f"at most {MAX_NEW_TOKENS} new tokens per answer, got {text}")
    return value


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """RECIPE and the repeatable `--set KEY=VALUE` overrides."""
    parser.add_argument("recipe", help="recipe YAML file")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key, e.g. --set train.max_steps=5 (repeatable)")
