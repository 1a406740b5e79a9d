"""`train.padding_free`: a micro-batch of text rows as one sequence, rows end to end, positions restarting at each
row; each row attends to itself only, so every row's loss is the one it has in a padded batch."""

from __future__ import annotations

import itertools

import pytest
import torch

from toolkit.bench.harness import synthetic_rows
from toolkit.config.precision import Accelerator
from toolkit.config.recipe import recipe_from_dict
from toolkit.model import loading
from toolkit.training import trainer

LENGTHS = (12, 20, 16, 9)


def built_trainer(tmp_path, padding_free: bool, attention: str = "sdpa", batch_size: int = 2):
    from datasets import Dataset

    recipe = recipe_from_dict({
        "model": {"name": "builtin:tiny-mllama", "attn_implementation": attention},
        "data": {"train": "unused.jsonl"},
        "train": {"batch_size": batch_size, "max_steps": 2, "logging_steps": 1, "padding_free": padding_free},
        "lora": {"dropout": 0.0},
    })
    tokenizer = loading.load_tokenizer("builtin:tiny-mllama")
    rows = Dataset.from_list(synthetic_rows(list(LENGTHS), 900, seed=0))
    built, _ = trainer.build_trainer(recipe, precision="fp32", device=Accelerator(cuda=False, bf16=False),
                                     tokenizer=tokenizer, train_dataset=rows, output_dir=str(tmp_path),
                                     save_strategy="no", train_sampling_strategy="sequential")
    return built, recipe


def row_losses(model, batch) -> list[float]:
    """Each row's mean negative log-likelihood over its learned tokens, rows told apart by where positions
    restart (packed) or by the batch dimension (padded)."""
    with torch.no_grad():
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), reduction="none",
                                            ignore_index=-100).view(labels.shape[0], -1)
    learned = labels[:, 1:] != -100
    if labels.shape[0] > 1:  # padded: a row per line
        return [(nll[i][learned[i]].sum() / learned[i].sum()).item() for i in range(labels.shape[0])]
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [labels.shape[1]]
    return [(nll[0, a:b - 1][learned[0, a:b - 1]].sum() / learned[0, a:b - 1].sum()).item()
            for a, b in itertools.pairwise(starts)]


def test_a_padding_free_batch_is_one_sequence_with_positions_restarting_at_each_row(tmp_path):
    built, _ = built_trainer(tmp_path, padding_free=True)
    batch = built.data_collator([built.train_dataset[i] for i in range(2)])
    assert "attention_mask" not in batch
    first, second = (len(built.train_dataset[i]["input_ids"]) for i in range(2))
    assert batch["input_ids"].shape == (1, first + second)
    assert batch["position_ids"][0].tolist() == list(range(first)) + list(range(second))
    assert batch["input_ids"][0].tolist() == built.train_dataset[0]["input_ids"] + built.train_dataset[1]["input_ids"]


@pytest.mark.parametrize("attention", ["sdpa", "flex_attention"])
def test_a_packed_batch_gives_each_row_its_padded_loss(tmp_path, attention):
    packed, _ = built_trainer(tmp_path / "packed", padding_free=True, attention=attention, batch_size=4)
    padded, _ = built_trainer(tmp_path / "padded", padding_free=False, batch_size=4)
    rows = [packed.train_dataset[i] for i in range(4)]
    packed_batch, padded_batch = packed.data_collator(rows), padded.data_collator(rows)
    assert padded_batch["input_ids"].shape == (4, 20) and packed_batch["input_ids"].shape[0] == 1
    expected = row_losses(padded.model, padded_batch)
    assert row_losses(packed.model, packed_batch) == pytest.approx(expected, rel=1e-5)


def test_rows_of_a_packed_batch_that_saw_each_other_would_lose_their_padded_loss(tmp_path, monkeypatch):
    """The check above can fail: without transformers' packed-sequence mask a packed row reads the rows before it."""
    import transformers.masking_utils as masking

    packed, _ = built_trainer(tmp_path / "packed", padding_free=True, batch_size=4)
    padded, _ = built_trainer(tmp_path / "padded", padding_free=False, batch_size=4)
    rows = [packed.train_dataset[i] for i in range(4)]
    expected = row_losses(padded.model, padded.data_collator(rows))
    monkeypatch.setattr(masking, "find_packed_sequence_indices", lambda position_ids: None)
    leaked = row_losses(packed.model, packed.data_collator(rows))
    assert leaked[0] == pytest.approx(expected[0], rel=1e-5)  # the first row has nothing before it
    assert all(abs(a - b) > 1e-4 for a, b in zip(leaked[1:], expected[1:]))


def test_padding_free_training_logs_the_padded_runs_losses(tmp_path):
    logs = {}
    for padding_free in (False, True):
        built, recipe = built_trainer(tmp_path / str(padding_free), padding_free=padding_free)
        trainer.run_training(built, recipe, "fp32")
        logs[padding_free] = [e for e in built.state.log_history if "loss" in e]
    assert len(logs[True]) == len(logs[False]) == 2
    assert [e["loss"] for e in logs[True]] == pytest.approx([e["loss"] for e in logs[False]], rel=1e-5)
    assert [e["grad_norm"] for e in logs[True]] == pytest.approx([e["grad_norm"] for e in logs[False]], rel=1e-4)


def test_flex_attention_is_refused_for_training_on_the_cpu(tmp_path, tiny_data, capsys):
    from conftest import tiny_recipe

    from toolkit.cli import main

    recipe = tiny_recipe(tmp_path, tiny_data)
    assert main(["validate", str(recipe), "--set", "model.attn_implementation=flex_attention"]) == 2
    assert ("model.attn_implementation=flex_attention trains on a CUDA GPU only (PyTorch has no FlexAttention "
            "backward on the CPU); use sdpa on CPU") in " ".join(capsys.readouterr().out.split())


def test_auto_attention_is_flex_only_to_train_padding_free_on_a_gpu_whose_pytorch_has_no_varlen(monkeypatch):
    from toolkit.model import varlen

    monkeypatch.setattr(varlen, "available", lambda: False)
    gpu, cpu = Accelerator(cuda=True, bf16=True, name="gpu"), Accelerator(cuda=False, bf16=False)

    def kernel(device, training, padding_free=True, chosen=None):
        model = {"name": "builtin:tiny-mllama", **({"attn_implementation": chosen} if chosen else {})}
        recipe = recipe_from_dict({"model": model, "data": {"train": "unused.jsonl"},
                                   "train": {"padding_free": padding_free}})
        return loading.attention_kernel(recipe, device, training)

    assert kernel(gpu, training=True) == "flex_attention"
    assert kernel(gpu, training=True, padding_free=False) == "sdpa"  # padded batches: SDPA's fused kernels
    assert kernel(gpu, training=False) == "sdpa"  # eval and generate pad their batches
    assert kernel(cpu, training=True) == "sdpa"  # no FlexAttention backward on the CPU
    assert kernel(gpu, training=True, chosen="sdpa") == "sdpa"  # what the recipe names is what loads
    assert kernel(cpu, training=False, chosen="eager") == "eager"


def test_padding_free_training_on_the_cpu_loads_sdpa_when_attention_is_auto(tmp_path, monkeypatch):
    asked = []
    chosen = loading.attention_kernel
    monkeypatch.setattr(loading, "attention_kernel", lambda *args: asked.append(args[2]) or chosen(*args))
    built, recipe = built_trainer(tmp_path, padding_free=True, attention="auto")
    assert recipe.model.attn_implementation == "auto"
    assert built.model.config._attn_implementation == "sdpa"
    assert asked == [True]  # the Trainer's model is loaded for training: on a GPU this one would be flex
