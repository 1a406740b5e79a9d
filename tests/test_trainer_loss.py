"""Without token metrics the trainer computes TRL's loss, and logs neither entropy nor token accuracy."""

from __future__ import annotations

import pytest

from toolkit import modeling, trainer
from toolkit.commands.bench import synthetic_rows
from toolkit.recipe import recipe_from_dict
from toolkit.translate import Accelerator


def train_two_steps(tmp_path, token_metrics: bool, batch_size: int = 2, grad_accum: int = 1,
                    lengths=(12, 20, 16, 9), keep=None):
    from datasets import Dataset

    recipe = recipe_from_dict({
        "model": {"name": "builtin:tiny-mllama"}, "data": {"train": "unused.jsonl"},
        "train": {"batch_size": batch_size, "grad_accum": grad_accum, "max_steps": 2, "logging_steps": 1,
                  "token_metrics": token_metrics},
        "lora": {"dropout": 0.0},
    })
    tokenizer = modeling.load_tokenizer("builtin:tiny-mllama")
    rows = Dataset.from_list(synthetic_rows(list(lengths), 900, seed=0))
    built, _ = trainer.build_trainer(recipe, precision="fp32", device=Accelerator(cuda=False, bf16=False),
                                     tokenizer=tokenizer, train_dataset=rows, output_dir=str(tmp_path),
                                     save_strategy="no", train_sampling_strategy="sequential")
    trainer.run_training(built, recipe, "fp32")
    if keep is not None:
        keep.update({n: p.detach().clone() for n, p in built.model.named_parameters() if p.requires_grad})
    return [entry for entry in built.state.log_history if "loss" in entry]


def test_lean_loss_is_trls_loss_without_the_metrics(tmp_path):
    with_metrics = train_two_steps(tmp_path / "a", token_metrics=True)
    without = train_two_steps(tmp_path / "b", token_metrics=False)
    assert [e["loss"] for e in without] == pytest.approx([e["loss"] for e in with_metrics], rel=1e-5)
    assert all("mean_token_accuracy" in e and "entropy" in e for e in with_metrics)
    assert not any("mean_token_accuracy" in e or "entropy" in e for e in without)


def test_loss_and_gradient_are_per_token_over_the_accumulated_batch(tmp_path):
    """Micro-batches of very different token counts: 1 x 8 rows and 2 x 4 rows log the same loss and gradient norm
    and train the same adapter, because both average over every completion token of the step (a mean per
    micro-batch would weigh a short micro-batch's tokens more)."""
    lengths = [60, 50, 56, 44, 8, 10, 9, 12] * 2  # the second micro-batch of each step is short
    whole, split = {}, {}
    one = train_two_steps(tmp_path / "a", False, batch_size=8, grad_accum=1, lengths=lengths, keep=whole)
    two = train_two_steps(tmp_path / "b", False, batch_size=4, grad_accum=2, lengths=lengths, keep=split)
    assert len(one) == len(two) == 2
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["grad_norm"] == pytest.approx(a["grad_norm"],
                                                                                                  rel=1e-4)
    assert whole.keys() == split.keys() and whole
    assert all((whole[n] - split[n]).abs().max() < 1e-5 for n in whole)
