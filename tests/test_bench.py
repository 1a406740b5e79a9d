"""`toolkit bench` arithmetic on CPU: tokens per step, FLOPs per token, MFU. Speed itself is measured on a GPU."""

from __future__ import annotations

import pytest

from toolkit.commands.bench import (
    full_size_config,
    lora_flops_per_token,
    parse_setup,
    peak_flops,
    step_tokens,
    summarize,
    text_params_per_token,
)
from toolkit.errors import ToolkitError


def test_full_size_text_params_counted_by_hand():
    text = full_size_config().text_config
    attention = 4096 * 4096 * 2 + 4096 * 1024 * 2  # q, o and the grouped k, v (8 of 32 heads)
    mlp = 3 * 4096 * 14336
    lm_head = 4096 * 128256
    assert text_params_per_token(text) == 32 * (attention + mlp) + lm_head  # 40 layers less 8 cross-attention
    assert text_params_per_token(text) == 7_504_658_432


def test_flops_per_token():
    assert lora_flops_per_token(1000, recompute=False) == 4000
    assert lora_flops_per_token(1000, recompute=True) == 6000


def test_tokens_per_optimizer_step_sum_micro_batches():
    records = [(10, 16), (12, 16), (30, 32), (31, 32), (5, 8)]
    assert step_tokens(records, grad_accum=2) == [(22, 32), (61, 64)]


def test_summary_excludes_warmup_and_reports_mfu():
    times = [5.0, 1.0, 2.0, 1.0]
    tokens = [(999, 999), (100, 200), (300, 400), (100, 200)]
    result = summarize(times, tokens, warmup=1, flops_per_token=1e9, peak=1e12)
    assert result["measured_steps"] == 3
    assert result["real_tok_s"] == pytest.approx(500 / 4)
    assert result["padded_tok_s"] == pytest.approx(800 / 4)
    assert result["pad_efficiency"] == pytest.approx(500 / 800)
    assert result["median_step_s"] == 1.0
    assert result["mfu"] == pytest.approx(125 * 1e9 / 1e12)
    with pytest.raises(ToolkitError):
        summarize(times, tokens, warmup=4, flops_per_token=1.0, peak=None)


def test_peak_flops_by_gpu_name():
    assert peak_flops("NVIDIA H200") == 989.4e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("cpu") is None


def test_setups():
    label, overrides = parse_setup("fast: train.batch_size=32 quantization.mode=4bit")
    assert label == "fast" and overrides == ["train.batch_size=32", "quantization.mode=4bit"]
    assert "bench.pad_to=512" in parse_setup("original")[1]
    with pytest.raises(ToolkitError):
        parse_setup("train.batch_size=32")
