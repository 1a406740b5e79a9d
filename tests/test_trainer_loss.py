"""Without token metrics the trainer computes TRL's loss, and logs neither entropy nor token accuracy."""

from __future__ import annotations

import pytest

from toolkit import modeling, trainer
from toolkit.commands.bench import synthetic_rows
from toolkit.recipe import recipe_from_dict
from toolkit.translate import Accelerator


def train_two_steps(tmp_path, token_metrics: bool):
    from datasets import Dataset

    recipe = recipe_from_dict({
        "model": {"name": "builtin:tiny-mllama"}, "data": {"train": "unused.jsonl"},
        "train": {"batch_size": 2, "max_steps": 2, "logging_steps": 1, "token_metrics": token_metrics},
        "lora": {"dropout": 0.0},
    })
    tokenizer = modeling.load_tokenizer("builtin:tiny-mllama")
    rows = Dataset.from_list(synthetic_rows([12, 20, 16, 9], 900, seed=0))
    built, _ = trainer.build_trainer(recipe, precision="fp32", device=Accelerator(cuda=False, bf16=False),
                                     tokenizer=tokenizer, train_dataset=rows, output_dir=str(tmp_path),
                                     save_strategy="no", train_sampling_strategy="sequential")
    trainer.run_training(built, recipe, "fp32")
    return [entry for entry in built.state.log_history if "loss" in entry]


def test_lean_loss_is_trls_loss_without_the_metrics(tmp_path):
    with_metrics = train_two_steps(tmp_path / "a", token_metrics=True)
    without = train_two_steps(tmp_path / "b", token_metrics=False)
    assert [e["loss"] for e in without] == pytest.approx([e["loss"] for e in with_metrics], rel=1e-5)
    assert all("mean_token_accuracy" in e and "entropy" in e for e in with_metrics)
    assert not any("mean_token_accuracy" in e or "entropy" in e for e in without)
