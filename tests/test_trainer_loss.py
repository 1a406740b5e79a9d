"""Without token metrics the trainer computes TRL's loss and token count, and logs neither entropy nor token
accuracy."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from toolkit.bench.harness import synthetic_rows
from toolkit.config.precision import Accelerator
from toolkit.config.recipe import recipe_from_dict
from toolkit.model import loading
from toolkit.training import trainer


def built_trainer(tmp_path, token_metrics: bool = False, lengths=(12, 20)):
    """The tiny model's trainer, not trained, and one collated batch of its rows."""
    from datasets import Dataset

    recipe = recipe_from_dict({
        "model": {"name": "builtin:tiny-mllama"}, "data": {"train": "unused.jsonl"},
        "train": {"batch_size": 2, "max_steps": 1, "token_metrics": token_metrics}, "lora": {"dropout": 0.0},
    })
    tokenizer = loading.load_tokenizer("builtin:tiny-mllama")
    rows = Dataset.from_list(synthetic_rows(list(lengths), 900, seed=0))
    built, _ = trainer.build_trainer(recipe, precision="fp32", device=Accelerator(cuda=False, bf16=False),
                                     tokenizer=tokenizer, train_dataset=rows, output_dir=str(tmp_path),
                                     save_strategy="no")
    return built, built.data_collator([built.train_dataset[i] for i in range(len(lengths))])


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
    # TRL's running count of attention-mask ones, read by the lean run only when it logs: 60 + 8, then all 128
    assert [e["num_tokens"] for e in without] == [e["num_tokens"] for e in with_metrics] == [68, 128]


class FakeOutputs:
    """What the fused LM head returns for two rows: per-token log-probabilities, zero off the completion."""

    log_probs = torch.tensor([[-1.0, -2.0, 0.0], [-3.0, 0.0, 0.0]])
    label_mask = log_probs != 0
    entropy = torch.zeros(2, 3)
    is_top1 = torch.zeros(2, 3, dtype=torch.bool)


def fake_trainer(num_processes: int, tp_size: int, parallelism=None):
    """Just what TRL's and the toolkit's compute_loss read of a trainer, on processes that all got this batch."""
    from collections import defaultdict

    accelerator = SimpleNamespace(num_processes=num_processes, parallelism_config=parallelism,
                                  gather_for_metrics=lambda tensor: tensor * num_processes)  # every process alike
    return SimpleNamespace(args=SimpleNamespace(average_tokens_across_devices=True, loss_type="nll", max_length=None),
                           accelerator=accelerator, get_tp_size=lambda: tp_size, _tp_size=tp_size,
                           model=SimpleNamespace(training=True), aux_loss_enabled=False, compute_loss_func=None,
                           label_smoother=None, token_metrics=False, _metrics={"train": defaultdict(list)},
                           _total_train_tokens=0)


def batch():
    return {"input_ids": torch.zeros(2, 3, dtype=torch.long), "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]])}


def test_lean_loss_scales_by_processes_over_the_tensor_parallel_size_as_trl_does():
    """8 processes in tensor-parallel pairs, 24 completion tokens among them: the loss sums this process's 6 nats
    over the 24 and multiplies by the 4 data-parallel copies DDP averages over; TRL's own compute_loss gives the
    same, and the same token count (5 ones in the mask, on 8 processes, once per pair: 20)."""
    from trl import SFTTrainer

    model = lambda **inputs: FakeOutputs()  # noqa: E731
    trls, lean = fake_trainer(8, 2), fake_trainer(8, 2)
    expected = SFTTrainer.compute_loss(trls, model, batch(), num_items_in_batch=torch.tensor(24))
    loss = trainer.lean_loss(lean, model, batch(), num_items_in_batch=torch.tensor(24))
    assert loss.item() == expected.item() == 6 / 24 * 4
    assert trainer.batch_tokens(lean, batch()).item() == trls._total_train_tokens == 20


@pytest.mark.parametrize("parallelism, applies", [(None, True), ({"tp_size": 2}, True),
                                                  ({"sp_size": 2, "sp_backend": "deepspeed"}, False),
                                                  ({"cp_size": 2}, False)])
def test_a_sharded_sequence_gets_trls_compute_loss(parallelism, applies):
    """Sequence (Ulysses) and context parallelism split a row over processes; lean_loss does not reduce a loss
    across them, so those steps fall back to TRL's compute_loss. Tensor parallelism alone keeps the lean loss."""
    from accelerate.parallelism_config import ParallelismConfig

    config = ParallelismConfig(**parallelism) if parallelism else None
    applies_here = trainer.sft_trainer_class().lean_loss_applies
    assert applies_here(fake_trainer(8, 2, config), return_outputs=False) is applies


def test_trls_own_compute_loss_counts_on_from_the_lean_steps(tmp_path):
    """A lean training step leaves its count pending; TRL's compute_loss (here an eval step) reads the running total,
    so the count is added before TRL runs: 12 + 20 tokens, not 0."""
    built, inputs = built_trainer(tmp_path)
    built.model.train()
    built.compute_loss(built.model, dict(inputs), num_items_in_batch=None)
    assert built._total_train_tokens == 0 and built.pending_tokens.item() == 32
    built.model.eval()
    with torch.no_grad():
        built.compute_loss(built.model, dict(inputs))
    assert built._total_train_tokens == 32 and built.pending_tokens is None
    assert built._metrics["eval"]["num_tokens"] == [32]


def test_log_extra_adds_its_own_entry_and_leaves_trls_running_metrics(tmp_path):
    """An extra metric is an entry of its own: TRL's running metrics stay for the step's loss entry, and whether
    the Trainer logs after this step is what it was."""
    built, _ = built_trainer(tmp_path)
    built._metrics["train"]["entropy"] = [1.5, 2.5]
    built.state.global_step = 3
    built.control.should_log = True
    built.log_extra({"sample_term_accuracy": 0.25})
    assert built.state.log_history == [{"sample_term_accuracy": 0.25, "epoch": 0, "step": 3}]
    assert built.control.should_log is True
    built.log({"loss": 1.0})
    assert built.state.log_history[-1] == {"loss": 1.0, "entropy": 2.0, "epoch": 0, "step": 3}
