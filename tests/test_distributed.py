"""Several processes keep the recipe's global batch: two CPU processes (gloo) train the same adapter as one."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import tiny_recipe
from toolkit.cli import main
from toolkit.distributed import per_process_batch, strategy_kwargs
from toolkit.errors import ToolkitError


def test_every_split_keeps_the_global_batch_or_is_refused():
    for batch_size in range(1, 13):
        for grad_accum in range(1, 9):
            for processes in range(1, 9):
                try:
                    micro, accum = per_process_batch(batch_size, grad_accum, processes)
                except ToolkitError:
                    assert batch_size % processes and grad_accum % processes
                    continue
                assert micro * accum * processes == batch_size * grad_accum, (batch_size, grad_accum, processes)


def test_global_batch_is_split_over_processes():
    assert per_process_batch(2, 4, 1) == (2, 4)
    assert per_process_batch(2, 4, 2) == (2, 2)  # fewer accumulation steps first
    assert per_process_batch(24, 1, 2) == (12, 1)  # then smaller micro-batches
    assert per_process_batch(24, 1, 8) == (3, 1)
    with pytest.raises(ToolkitError, match="cannot be split evenly over 5 processes"):
        per_process_batch(24, 1, 5)


def test_strategies_translate_to_trainer_arguments():
    assert strategy_kwargs("ddp", True) == {}
    fsdp = strategy_kwargs("fsdp", True)
    assert fsdp["fsdp"] == "full_shard auto_wrap" and fsdp["gradient_checkpointing"] is False
    assert fsdp["fsdp_config"]["activation_checkpointing"] is True
    assert "MllamaSelfAttentionDecoderLayer" in fsdp["fsdp_config"]["transformer_layer_cls_to_wrap"]
    zero3 = json.loads(open(strategy_kwargs("zero3", False)["deepspeed"], encoding="utf-8").read())
    assert zero3["zero_optimization"]["stage"] == 3


def test_two_processes_train_the_same_adapter_as_one(tmp_path, tiny_data, capsys):
    recipe = tiny_recipe(tmp_path, {"train": tiny_data["train"], "eval": None},
                         train={"max_steps": 4, "batch_size": 2, "grad_accum": 2})
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["sft", str(recipe), "--output-dir", str(one)]) == 0
    assert main(["sft", str(recipe), "--output-dir", str(two), "--gpus", "2"]) == 0
    first, second = load_file(str(one / "adapter_model.safetensors")), load_file(str(two / "adapter_model.safetensors"))
    assert first.keys() == second.keys()
    for name in first:
        assert (first[name] - second[name]).abs().max() < 1e-5, name
    history = json.loads((two / "metrics.json").read_text(encoding="utf-8"))
    assert history["summary"]["steps"] == 4
    single = json.loads((one / "metrics.json").read_text(encoding="utf-8"))
    logged = [[(e["step"], e["loss"], e["grad_norm"]) for e in h["log_history"] if "loss" in e] for h in (single, history)]
    assert [step for step, _, _ in logged[1]] == [1, 2, 4]  # the loss is per token over both processes' rows
    for (_, loss, norm), (_, loss2, norm2) in zip(*logged, strict=True):
        assert loss2 == pytest.approx(loss, rel=1e-5) and norm2 == pytest.approx(norm, rel=1e-4)
    assert (two / "recipe.yaml").exists() and (two / "loss.png").exists()
