"""`toolkit validate RECIPE [--show N]`: every check `sft` makes before training (schema, data, lengths, images, LoRA
targets), and optionally the first rows exactly as they will be trained."""

from __future__ import annotations

import argparse
from collections import Counter

from rich.markup import escape

from toolkit.commands.common import add_recipe_arguments, non_negative_int
from toolkit.config.recipe import load_recipe
from toolkit.model.lora import cross_attention_layers, part_of
from toolkit.training import memory
from toolkit.training.prepare import prepare, show_plan
from toolkit.ui.preview import show_rows
from toolkit.ui.report import console


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="toolkit validate", description="Check a recipe without training.")
    add_recipe_arguments(parser)
    parser.add_argument("--show", type=non_negative_int, default=0, metavar="N",
                        help="print the first N training rows as trained, learned tokens highlighted")
    args = parser.parse_args(argv)
    recipe = load_recipe(args.recipe, args.overrides)
    prepared = prepare(recipe)
    prepared, plan = memory.memory_plan(prepared)
    show_plan(prepared)
    if plan:
        console.print(f"memory: {memory.plan_note(plan, prepared.recipe)}", soft_wrap=True)
    if args.show:
        show_rows(prepared, args.show)
    cross = cross_attention_layers(prepared.model_config)
    parts = Counter(part_of(name, cross) for name in prepared.lora_modules)
    where = ", ".join(f"{n} {part}" for part, n in sorted(parts.items()))
    console.print(f"[green]ok[/]: {escape(args.recipe)} is valid; LoRA wraps {len(prepared.lora_modules)} modules ({where})")
    return 0
