"""Without token metrics the trainer computes TRL's loss, and logs neither entropy nor token accuracy."""

from __future__ import annotations

import pytest

from toolkit.bench.harness import synthetic_rows
from toolkit.config.precision import Accelerator
from toolkit.config.recipe import recipe_from_dict
from toolkit.model import loading
from toolkit.training import trainer


def train_two_steps(tmp_path, token_metrics: bool, batch_size: int = 2, grad_accum: int = 1,
                    lengths=(12, 20, 16, 9), keep=None):
    from datasets import Dataset

    recipe = recipe_from_dict({
        "model": {"name": "builtin:tiny-mllama"}, "data": {"train": "unused.jsonl"},
        "train": {"batch_size": batch_size, "grad_accum": grad_accum, "max_steps": 2, "logging_steps": 1,
                  "token_metrics": token_metrics},
        "lora": {"dropout": 0.0},
    })
    tokenizer = loading.load_tokenizer("builtin:tiny-mllama")
    rows = Dataset.from_list(synthetic_rows(list(lengths), 900, seed=0))
    built, _ = trainer.build_trainer(recipe, precision="fp32", device=Accelerator(cuda=False, bf16=False),
                                     tokenizer=tokenizer, train_dataset=rows, output_dir=str(tmp_path),
                                     save_strategy="no", train_sampling_strategy="sequential")
    trainer.run_training(built, recipe, "fp32")
    if keep is not None:
        keep.update({n: p.detach().clone() for n, p in built.model.named_parameters() if p.requires_grad})
    return [entry for entry in built.state.log_history if "loss" in entry]


def test_lean_loss_is_trls_loss_without_the_metrics(tmp_path):
    """TRL's loss over batches of 2 rows, and the lean loss over the same rows as 2 accumulated micro-batches of 1
    whose token counts differ (60 and 8, 50 and 10): the same logged losses, gradient norms and adapter, because
    both average over every completion token of the step (a mean per micro-batch would weigh the short row's
    tokens 7 times more)."""
    lengths = (60, 8, 50, 10)
    trls, lean = {}, {}
    with_metrics = train_two_steps(tmp_path / "a", token_metrics=True, lengths=lengths, keep=trls)
    without = train_two_steps(tmp_path / "b", token_metrics=False, batch_size=1, grad_accum=2, lengths=lengths,
                              keep=lean)
    assert len(with_metrics) == len(without) == 2
    assert [e["loss"] for e in without] == pytest.approx([e["loss"] for e in with_metrics], rel=1e-5)
    assert [e["grad_norm"] for e in without] == pytest.approx([e["grad_norm"] for e in with_metrics], rel=1e-4)
    assert trls.keys() == lean.keys() and trls
    assert all((trls[n] - lean[n]).abs().max() < 1e-5 for n in trls)
    assert all("mean_token_accuracy" in e and "entropy" in e for e in with_metrics)
    assert not any("mean_token_accuracy" in e or "entropy" in e for e in without)
