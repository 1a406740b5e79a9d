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


def run_path(run) -> Path:
    """A `Run`'s directory, or a path given as text (expanded as the commands expand theirs)."""
    from toolkit.io import files

    return run.path if isinstance(run, Run) else files.expand(str(run))


def extract(run, output=None, *, format: str | None = None, overwrite: bool = False):
    """`toolkit extract RUN --output OUTPUT`: the run's adapter state_dict (PEFT's keys) written to one file, with
    the adapter config beside it, both put in place only once the file reads back identical. `format`:
    "safetensors" or "pt" (default: from the name's suffix). Returns a `toolkit.export.extraction.Extracted` (the
    file, its format, the adapter config, tensor and parameter counts).

    Raises `ToolkitError` with the command's one line for: not a finished run, a format that contradicts the name,
    an output that is a directory or inside the run, an existing output without `overwrite` (or with it, one
    extract did not write), an unwritable folder, an adapter with no tensors, a file that does not read back."""
    from toolkit.export import extraction

    return extraction.extract(run_path(run), None if output is None else str(output), format, overwrite)


def merge(run, output, *, dtype: str | None = None, tolerance: float | None = None, max_shard_size: str = "5GB",
          overwrite: bool = False) -> dict:
    """`toolkit merge RUN --output OUTPUT`: the adapter folded into the full-precision base, saved as a plain model
    (from_pretrained, no PEFT), loaded back and checked against base + adapter's logits before it is put in place.
    Returns the report (merge_report.json's content: max_abs_delta, tolerance, adapter_effect, prompts, ...).

    Raises `ToolkitError` with the command's one line for: not a finished run, an output that is a file, overlaps
    the run, is not empty (without `overwrite`) or is not a merged model the toolkit made (with it), an unwritable
    or too long name, a dtype, tolerance or shard size that cannot work; and `toolkit.export.merging.CheckFailed`
    (a `ToolkitError`, `toolkit merge` exits 1 on it) when the merged model is not within tolerance or not a plain
    model: nothing is written to `output` then."""
    from toolkit.export import merging
    from toolkit.io import files

    run_dir, out = run_path(run), files.expand(str(output))
    recipe, dtype = merging.start(run_dir, out, dtype, overwrite, tolerance, max_shard_size)
    return merging.merge_run(run_dir, out, recipe, dtype, tolerance, max_shard_size, overwrite)


def bench(recipe, *, compare=(), overrides=(), no_recipe: bool = False, random_weights: bool = False, steps: int = 30,
          warmup: int = 5, lengths: str = "70:370", profile: bool = False, losses: bool = False,
          isolation: str = "process", setup_timeout: float | None = None, time_limit: float | None = None) -> dict:
    """`toolkit bench RECIPE` without its printing: real training steps of the recipe (and of each `compare` setup,
    'original' or 'LABEL: key=value ...', measured first) on synthetic rows of `lengths` tokens (MIN:MAX), each
    setup in its own process unless `isolation="none"`. Returns what bench.json holds: `lengths`, `steps`,
    `warmup` and `results`, one dict per setup (tokens/s and its spread, MFU, peak memory, ...; `error` instead
    for a setup that failed, ran past a limit or was skipped); nothing is written.

    Raises `ToolkitError` with the command's one line, before any setup runs, for: steps below 1 or warmup below
    0, an unreadable recipe, a setup or `bench.*` key that cannot be read, a recipe a setup makes invalid, bad
    lengths, a limit that is not a positive number of seconds, and `setup_timeout` or `bench.timeout` without
    process isolation. A setup that fails while measuring is reported in its result, not raised."""
    from toolkit.bench import harness

    planned = harness.plan_bench(str(recipe), list(overrides), list(compare), no_recipe=no_recipe,
                                 random_weights=random_weights, steps=steps, warmup=warmup, lengths=lengths,
                                 profile=profile, losses=losses, isolation=isolation, setup_timeout=setup_timeout,
                                 time_limit=time_limit)
    return planned.document([harness.run_setup(planned, setup) for setup in planned.setups])
