"""`model.attn_implementation: varlen`: padding-free batches through PyTorch's variable-length FlashAttention.

The kernel runs on CUDA only; here a stand-in computes what it computes (each row's causal attention, keys with
fewer heads shared by groups of query heads) one row at a time with SDPA, so that everything around it (rows found
from the positions, layouts in and out, the model's wiring, the refusals) is checked on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_padding_free import built_trainer, row_losses
from toolkit.config.precision import Accelerator
from toolkit.config.recipe import recipe_from_dict
from toolkit.errors import ToolkitError
from toolkit.model import loading, varlen


def stand_in_kernel(query, key, value, starts, longest, scale):
    """Each row's causal SDPA on (tokens, heads, dim), keys' heads repeated for their query-head groups."""
    assert starts.dtype == torch.int32 and longest == int((starts[1:] - starts[:-1]).max())
    groups = query.shape[1] // key.shape[1]
    out = torch.empty_like(query)
    for a, b in zip(starts[:-1].tolist(), starts[1:].tolist()):
        q, k, v = (t[a:b].transpose(0, 1) for t in (query, key, value))
        k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                     scale=scale).transpose(0, 1)
    return out


def test_rows_are_found_where_positions_restart():
    starts, longest = varlen.row_starts(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]]))
    assert starts.tolist() == [0, 3, 5, 9] and starts.dtype == torch.int32 and longest == 4
    starts, longest = varlen.row_starts(torch.tensor([[0, 1, 2, 3, 4]]))
    assert starts.tolist() == [0, 5] and longest == 5


def test_positions_that_do_not_start_a_row_are_refused():
    with pytest.raises(ToolkitError, match=r"positions start at 0 for every row; these do not start at 0 \(first: "
                                           r"\[3\]\)"):
        varlen.row_starts(torch.tensor([[3, 4, 0, 1]]))


def test_rows_are_found_once_per_forward_pass(monkeypatch):
    found = []
    monkeypatch.setattr(varlen, "row_starts", lambda positions: found.append(positions) or (positions, 1))
    positions, other = torch.tensor([[0, 1, 0]]), torch.tensor([[0, 1, 0]])
    for _ in range(3):  # every layer, and the recomputation, get the same tensor
        varlen.cached_row_starts(positions)
    varlen.cached_row_starts(other)
    assert found == [positions, other] and found[0] is positions and found[1] is other


def test_a_packed_batch_through_varlen_gives_each_row_its_padded_loss(tmp_path, monkeypatch):
    monkeypatch.setattr(varlen, "flash_kernel", stand_in_kernel)
    packed, _ = built_trainer(tmp_path / "packed", padding_free=True, attention="varlen", batch_size=4)
    padded, _ = built_trainer(tmp_path / "padded", padding_free=False, batch_size=4)
    assert packed.model.config.get_text_config()._attn_implementation == "varlen"
    text_layer = packed.model.get_base_model().model.language_model.layers[0].self_attn
    assert text_layer.num_key_value_heads < text_layer.config.num_attention_heads  # grouped-query attention
    rows = [packed.train_dataset[i] for i in range(4)]
    expected = row_losses(padded.model, padded.data_collator(rows))
    assert row_losses(packed.model, packed.data_collator(rows)) == pytest.approx(expected, rel=1e-5)


def test_a_kernel_that_let_rows_read_each_other_would_fail_that_check(tmp_path, monkeypatch):
    def one_row(query, key, value, starts, longest, scale):
        whole = torch.tensor([0, query.shape[0]], dtype=torch.int32)
        return stand_in_kernel(query, key, value, whole, query.shape[0], scale)

    monkeypatch.setattr(varlen, "flash_kernel", one_row)
    packed, _ = built_trainer(tmp_path / "packed", padding_free=True, attention="varlen", batch_size=4)
    padded, _ = built_trainer(tmp_path / "padded", padding_free=False, batch_size=4)
    rows = [packed.train_dataset[i] for i in range(4)]
    expected = row_losses(padded.model, padded.data_collator(rows))
    leaked = row_losses(packed.model, packed.data_collator(rows))
    assert leaked[0] == pytest.approx(expected[0], rel=1e-5)
    assert all(abs(a - b) > 1e-4 for a, b in zip(leaked[1:], expected[1:]))


def test_varlen_refuses_a_padded_batch():
    query = torch.zeros(2, 4, 3, 8)
    with pytest.raises(ToolkitError) as refused:
        varlen.attention(None, query, query, query, None, position_ids=torch.zeros(2, 3, dtype=torch.long))
    assert str(refused.value) == ("model.attn_implementation=varlen reads padding-free batches only (one sequence, "
                                  "positions restarting at each row, no mask); set train.padding_free: true or use "
                                  "sdpa")


def kernel(chosen, device, training, padding_free=True, precision="bf16"):
    recipe = recipe_from_dict({"model": {"name": "builtin:tiny-mllama", "attn_implementation": chosen},
                               "data": {"train": "unused.jsonl"}, "train": {"padding_free": padding_free}})
    return loading.attention_kernel(recipe, device, training, precision)


def test_auto_attention_is_varlen_to_train_padding_free_on_a_gpu_that_has_it(monkeypatch):
    gpu, cpu = Accelerator(cuda=True, bf16=True, name="gpu"), Accelerator(cuda=False, bf16=False)
    monkeypatch.setattr(varlen, "available", lambda: True)
    assert kernel("auto", gpu, training=True) == "varlen"
    assert kernel("auto", gpu, training=True, padding_free=False) == "sdpa"
    assert kernel("auto", gpu, training=False) == "sdpa"
    assert kernel("auto", cpu, training=True) == "sdpa"
    assert kernel("auto", gpu, training=True, precision="fp32") == "flex_attention"  # FlashAttention: bf16/fp16
    monkeypatch.setattr(varlen, "available", lambda: False)  # a PyTorch before 2.10, or a GPU before the A100
    assert kernel("auto", gpu, training=True) == "flex_attention"


def test_varlen_named_by_the_recipe_pads_with_sdpa_where_batches_are_padded():
    gpu = Accelerator(cuda=True, bf16=True, name="gpu")
    assert kernel("varlen", gpu, training=True) == "varlen"
    assert kernel("varlen", gpu, training=False) == "sdpa"  # eval, generate and merge pad their batches


@pytest.mark.parametrize(("settings", "expected"), [
    (["model.attn_implementation=varlen"],
     ("model.attn_implementation=varlen trains on a CUDA GPU of compute capability 8.0 or later with PyTorch 2.10 "
      "or later (this machine: no CUDA GPU); use auto or sdpa")),
    (["model.attn_implementation=varlen", "train.padding_free=false"],
     "model.attn_implementation=varlen reads padding-free batches only; set train.padding_free: true or use sdpa"),
])
def test_validate_refuses_varlen_where_it_cannot_train(tmp_path, tiny_data, capsys, settings, expected):
    from conftest import tiny_recipe

    from toolkit.cli import main

    recipe = tiny_recipe(tmp_path, tiny_data, train={"padding_free": True})
    args = ["validate", str(recipe)] + [arg for setting in settings for arg in ("--set", setting)]
    assert main(args) == 2
    assert expected in " ".join(capsys.readouterr().out.split())


def test_validate_refuses_varlen_in_fp32_on_a_gpu(tmp_path, monkeypatch):
    from toolkit.training import prepare

    monkeypatch.setattr(varlen, "available", lambda: True)
    recipe = recipe_from_dict({"model": {"name": "builtin:tiny-mllama", "attn_implementation": "varlen"},
                               "data": {"train": "unused.jsonl"}, "train": {"padding_free": True}})
    gpu = Accelerator(cuda=True, bf16=True, name="gpu")
    prepare.check_attention(recipe, gpu, "bf16")  # accepted
    with pytest.raises(ToolkitError) as refused:
        prepare.check_attention(recipe, gpu, "fp32")
    assert str(refused.value) == ("model.attn_implementation=varlen computes in bf16 or fp16 (FlashAttention); "
                                  "train.precision is fp32: use auto or flex_attention")
