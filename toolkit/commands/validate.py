"""`toolkit validate RECIPE`: every check `sft` makes before training (schema, data, lengths, LoRA targets)."""

from __future__ import annotations

import argparse
from collections import Counter

from rich.markup import escape

from toolkit.commands.common import add_recipe_arguments
from toolkit.prepare import prepare, show_plan
from toolkit.recipe import load_recipe
from toolkit.report import console
from toolkit.lora import part_of


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="toolkit validate", description="Check a recipe without training.")
    add_recipe_arguments(parser)
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    prepared = prepare(recipe)
    show_plan(prepared)
    parts = Counter(part_of(name) for name in prepared.lora_modules)
    where = ", ".join(f"{n} {part}" for part, n in sorted(parts.items()))
    console.print(f"[green]ok[/]: {escape(args.recipe)} is valid; LoRA wraps {len(prepared.lora_modules)} modules ({where})")
    return 0
