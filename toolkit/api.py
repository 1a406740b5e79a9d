"""The toolkit from Python: the verbs the commands run, for a notebook or a test.

    from toolkit import api

    run = api.train("recipes/quickstart.yaml", "runs/quickstart")
    result = api.evaluate(run, compare_base=True)
    print(result.summary["base"]["term_accuracy"], "->", result.summary["term_accuracy"])

Each verb does what its command does in one process, with the same checks, files and refusals (a `ToolkitError`
with the one line the command would print); the commands add their arguments, several processes and printing.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path


@dataclass(frozen=True)
class Run:
    """A finished run directory (`toolkit sft`'s output) and the recipe it was trained with."""

    path: Path
    recipe: object  # toolkit.config.recipe.Recipe, as recorded in the run

    @classmethod
    def open(cls, path) -> Run:
        """Check that `path` is a complete run and read its recipe (no model loads)."""
        from toolkit.io import files
        from toolkit.runs import rundir

        path = files.expand(str(path))
        return cls(path, rundir.open_run(path))

    def load(self, quantize: bool = True):
        """(model with the adapter, tokenizer, recipe): the base as training loaded it (quantized as the recipe
        says, unless `quantize=False`), the run's adapter attached, in eval mode."""
        from toolkit.runs import rundir

        return rundir.load_trained(self.path, quantize=quantize)

    @property
    def summary(self) -> dict:
        """The training summary `toolkit sft` printed (metrics.json's `summary`: steps, losses, rows, time)."""
        import json

        from toolkit.runs import rundir

        return json.loads((self.path / rundir.METRICS_FILE).read_text(encoding="utf-8"))["summary"]


def plan(recipe, overrides=()):
    """A recipe (a YAML path, or a `Recipe`) checked as `toolkit validate` checks it: schema, data, images, token
    lengths, LoRA targets, with `batch_size: auto` and `checkpoint_layers: auto` resolved. Returns the prepared
    plan `train` takes (`toolkit.training.prepare.Prepared`)."""
    from toolkit.config.recipe import load_recipe
    from toolkit.training import memory
    from toolkit.training.prepare import prepare

    if isinstance(recipe, (str, Path)):
        recipe = load_recipe(str(recipe), list(overrides))
    elif overrides:
        raise ValueError("overrides apply to a recipe file; change a Recipe with model_copy instead")
    prepared = prepare(recipe)
    return memory.memory_plan(prepared)[0]


def train(recipe, run_dir=None, *, overrides=(), overwrite: bool = False, resume: bool = False) -> Run:
    """Train as `toolkit sft RECIPE --output-dir RUN_DIR` does in one process (`recipe`: a YAML path, a `Recipe`,
    or a plan from `plan`), and return the finished run. `overwrite` replaces a run directory the toolkit made;
    `resume` continues an interrupted one."""
    from toolkit.io import files
    from toolkit.training import fit
    from toolkit.training.prepare import Prepared, show_plan

    if isinstance(recipe, Prepared):
        if overrides:
            raise ValueError("overrides apply to a recipe file, not to a plan")
        path = files.expand(str(run_dir or recipe.recipe.output_dir))
        prepared = replace(recipe, recipe=recipe.recipe.model_copy(update={"output_dir": str(path)}))
    else:
        from toolkit.config.recipe import load_recipe

        loaded = load_recipe(str(recipe), list(overrides)) if isinstance(recipe, (str, Path)) else recipe
        path = files.expand(str(run_dir or loaded.output_dir))
        prepared = plan(loaded.model_copy(update={"output_dir": str(path)}))
    show_plan(prepared)
    fit.train_into(prepared, path, overwrite=overwrite, resume=resume)
    return Run.open(path)


def evaluate(run, data=None, **options):
    """`toolkit eval` without its printing: greedy answers for the run's eval rows (or `data`), scored by key
    terms. Options: compare_base, limit, batch_size, max_new_tokens, quantize, retention_check, retention_data.
    Returns a `toolkit.evaluation.run_eval.Evaluation` (`summary` is eval.json's content; `.write(json, run_dir)`
    writes the command's files)."""
    from toolkit.evaluation import run_eval

    return run_eval.evaluate(run.path if isinstance(run, Run) else Path(run), data, **options)
