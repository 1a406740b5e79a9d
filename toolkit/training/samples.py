"""Answers during training (`train.sample_every: N`): every N optimizer steps the model answers the first
`train.sample_rows` eval rows greedily; their term accuracy is logged as `sample_term_accuracy` (log history,
metrics.json, and any `train.report_to` tracker) and one answer is printed on one line.

The answers are made the way `toolkit eval` makes them: the training prompt (`encode.prompt`), greedy decoding with
eval's default batch size and answer length (`toolkit.evaluation.generation.generate_answers`), eval's key terms and its
`term_accuracy` metric. So the number logged at the last step is what `toolkit eval RUN --limit N` reports for the
finished run. The rows are the eval rows that fit `train.max_seq_length` (the ones `validate` counts).

Sampling must not change what is trained. It runs after the optimizer step (no gradient is pending), without
gradients, in eval mode (no dropout) with every module's own mode put back after, under the Trainer's autocast (so a
bf16 run generates as it trains), with the random number generators forked (nothing drawn here shifts later dropout
or shuffling). Generation pads on the left in each call, leaving the tokenizer (saved with the run) as it is. The
number is logged in an entry of its own (`log_extra` of `toolkit.training.trainer`), so the loss entries stay as they
are without sampling. Only the main process samples; under DDP the other processes wait for it at the next gradient
sync.
Sharded training (FSDP, ZeRO-3) would need every process in each forward pass, so it is refused there.
"""

from __future__ import annotations

from transformers import TrainerCallback

from toolkit.data import encode, reading
from toolkit.errors import ToolkitError
from toolkit.evaluation import generation
from toolkit.runs import rundir
from toolkit.training import distributed
from toolkit.ui import terminal
from toolkit.ui.report import console

# toolkit eval's defaults (tested to stay equal), so a sampled number is the one eval reports.
BATCH_SIZE = 8
MAX_NEW_TOKENS = 256
LOG_KEY = "sample_term_accuracy"


def check_recipe(recipe, eval_rows: list) -> None:
    """Before training: sample_every needs eval rows, and key terms in them (or a glossary) to score against."""
    settings = recipe.train
    if settings.sample_every is None:
        return
    if not eval_rows:
        raise ToolkitError("train.sample_every needs eval rows to answer, and this recipe has none; set data.eval "
                           "or data.eval_fraction, or remove train.sample_every")
    rows = eval_rows[: settings.sample_rows]
    if recipe.data.glossary is None and all(row.fields.get("terms") is None for row in rows):
        raise ToolkitError(f"train.sample_every: the first {len(rows)} eval rows have no 'terms' and data.glossary "
                           "is not set, so there is no term accuracy to log; add terms to the rows or name a glossary")


def attach(trainer, prepared, strategy: str) -> None:
    """Add the sampling callback to a built trainer when the recipe asks for it."""
    if prepared.recipe.train.sample_every is None:
        return
    if distributed.world_size() > 1 and strategy != "ddp":
        raise ToolkitError(f"train.sample_every works with --strategy ddp, not {strategy}: sharded training needs "
                           "every process in each forward pass, and only the main process samples")
    trainer.add_callback(SampleCallback(trainer, prepared))


class SampleCallback(TrainerCallback):
    """Every `train.sample_every` steps: greedy answers for a few eval rows, their term accuracy, one example."""

    def __init__(self, trainer, prepared):
        recipe = prepared.recipe
        self.trainer = trainer
        self.tokenizer = prepared.tokenizer
        self.every = recipe.train.sample_every
        self.rows = prepared.eval.rows[: recipe.train.sample_rows]
        self.prompts = [encode.prompt(row, recipe.data, self.tokenizer) for row in self.rows]
        self.references = [reading.reference(row, recipe.data) for row in self.rows]
        from toolkit.evaluation.scoring import key_terms_for

        self.key_terms = key_terms_for(recipe, self.rows, self.references)
        self.images = rundir.image_inputs(recipe, self.tokenizer) if any(p.images for p in self.prompts) else None
        self.metrics = None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every or not state.is_world_process_zero:
            return
        answers = self.answer(state.global_step)
        accuracy = self.accuracy(answers)
        if accuracy is not None:
            self.trainer.log_extra({LOG_KEY: accuracy})  # beside the step's loss entry, not in it
        self.show(state.global_step, accuracy, answers[0])

    def answer(self, step: int) -> list[str]:
        """Greedy answers from the model as it is at this step, leaving every training state as it was."""
        import torch

        model = self.trainer.model
        modes = [(module, module.training) for module in model.modules()]
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            model.eval()
            with torch.random.fork_rng(devices=devices), torch.no_grad(), self.trainer.accelerator.autocast():
                return generation.generate_answers(model, self.tokenizer, self.prompts, BATCH_SIZE, MAX_NEW_TOKENS,
                                                   label=f"samples at step {step}", images=self.images)
        finally:
            for module, training in modes:
                module.training = training

    def accuracy(self, answers: list[str]) -> float | None:
        """toolkit eval's term_accuracy of these answers (None when no sampled row has key terms)."""
        from toolkit.evaluation.scoring import load_metrics, score

        if self.metrics is None:
            self.metrics = load_metrics()
        return score(self.metrics, answers, self.references, self.key_terms)["term_accuracy"]

    def show(self, step: int, accuracy: float | None, answer: str) -> None:
        """One line: the step, the accuracy, the first row's key terms and its answer, cut to the terminal."""
        from rich.text import Text

        measured = "n/a" if accuracy is None else f"{accuracy:.3f}"
        asked = ", ".join(self.key_terms[0] or []) or "-"
        line = f"step {step} {LOG_KEY} {measured} | {terminal.one_line(asked)} -> {terminal.one_line(answer)}"
        console.print(Text(line, no_wrap=True, overflow="ellipsis"))
