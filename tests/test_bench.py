"""`toolkit bench` arithmetic on CPU: tokens per step, FLOPs per token, MFU. Speed itself is measured on a GPU."""

from __future__ import annotations

import pytest

from toolkit.bench.harness import (
    full_size_config,
    lora_flops_per_token,
    parse_setup,
    peak_flops,
    split_bench_overrides,
    step_tokens,
    summarize,
    text_params_per_token,
    warmup_batches,
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


def test_summary_excludes_warmup_and_reports_mfu_and_spread():
    times = [5.0, 1.0, 2.0, 1.0]
    tokens = [(999, 999), (100, 200), (300, 400), (100, 200)]
    result = summarize(times, tokens, warmup=1, flops_per_token=1e9, peak=1e12)
    assert result["measured_steps"] == 3
    assert result["real_tok_s"] == pytest.approx(500 / 4)
    assert result["padded_tok_s"] == pytest.approx(800 / 4)
    assert result["pad_efficiency"] == pytest.approx(500 / 800)
    assert result["median_step_s"] == 1.0
    assert result["mfu"] == pytest.approx(125 * 1e9 / 1e12)
    assert (result["real_tok_s_min"], result["real_tok_s_median"], result["real_tok_s_max"]) == (100, 100, 150)
    with pytest.raises(ToolkitError):
        summarize(times, tokens, warmup=4, flops_per_token=1.0, peak=None)


def test_warmup_replays_the_longest_and_shortest_batch_and_both_residues():
    lengths = [100, 120, 370, 200, 250, 90]  # padded to 8: 104, 120, 376, 200, 256, 96
    batches = [[0], [1], [2], [3], [4], [5]]
    picked = warmup_batches(batches, lengths, 3, multiple=8)
    assert picked[:2] == [2, 5]  # longest (376), shortest (96)
    assert {(-(-lengths[b] // 8) * 8) % 16 for b in picked} == {0, 8}
    assert warmup_batches(batches, lengths, 8, multiple=8)[6:] == picked[:2]  # more than there are: repeats
    assert warmup_batches(batches, lengths, 0, multiple=8) == []


def test_peak_flops_by_gpu_name():
    assert peak_flops("NVIDIA H200") == 989.4e12
    assert peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert peak_flops("cpu") is None
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989.4e12  # SXM
    assert peak_flops("NVIDIA H100 PCIe") == 756.5e12
    assert peak_flops("NVIDIA H100 NVL") == 835.5e12
    assert peak_flops("NVIDIA H200 NVL") == 835.5e12
    assert peak_flops("NVIDIA A100 80GB PCIe") == 312e12
    assert peak_flops("NVIDIA A10") == 125e12
    assert peak_flops("NVIDIA A10G") is None  # not an A10
    assert peak_flops("NVIDIA L40S") == 362.05e12


def test_setups():
    label, overrides = parse_setup("fast: train.batch_size=32 quantization.mode=4bit")
    assert label == "fast" and overrides == ["train.batch_size=32", "quantization.mode=4bit"]
    assert "bench.pad_to=512" in parse_setup("original")[1]
    assert parse_setup("original: bench.steps=5")[1][-1] == "bench.steps=5"
    label, overrides = parse_setup("b24@before: train.batch_size=24")
    assert overrides == ["train.fused_lora=false", "quantization.int8_matmul=int8", "train.token_metrics=true",
                         "train.batch_size=24"]
    with pytest.raises(ToolkitError):
        parse_setup("train.batch_size=32")


def test_bench_keys_are_checked():
    assert split_bench_overrides(["bench.steps=5", "train.batch_size=2"]) == (["train.batch_size=2"], {"steps": 5})
    with pytest.raises(ToolkitError, match="bench.pad_to"):
        split_bench_overrides(["bench.stepz=5"])


def test_bench_measures_a_recipe_on_cpu(tmp_path, tiny_data):
    """Two setups in this process: per-step spread, warm-up shapes, losses and the fused layers in the JSON."""
    import json

    from tests.conftest import tiny_recipe
    from toolkit.cli import main

    recipe = tiny_recipe(tmp_path, tiny_data, train={"batch_size": 2, "group_by_length": True})
    out = tmp_path / "bench.json"
    assert main(["bench", str(recipe), "--steps", "2", "--warmup", "1", "--lengths", "20:40", "--losses",
                 "--isolation", "none", "--json", str(out), "--compare", "plain@before: lora.upcast_inputs=true"]) == 0
    plain, fast = json.loads(out.read_text(encoding="utf-8"))["results"]
    assert plain["fused_layers"] == {"lora": 0, "int8": 0, "nf4": 0, "dense": 0, "fp8": 0, "fp8_held": 0} and fast["fused_layers"]["lora"] == 16
    assert plain["attention"] == fast["attention"] == "sdpa"  # auto on the CPU
    for result in (plain, fast):
        assert result["measured_steps"] == 2 and len(result["step_s"]) == 2 and len(result["losses"]) == 3
        assert result["real_tok_s_min"] <= result["real_tok_s_median"] <= result["real_tok_s_max"]
        assert result["warmup_lengths"] == [result["longest_padded"]]
    assert fast["losses"] == pytest.approx(plain["losses"], rel=1e-4)  # same batches, same learning


def test_bench_counts_image_batches_built_in_loader_workers(tmp_path, tiny_data):
    """Image batches are built in DataLoader workers; the bench still counts every measured step's tokens (it
    counts what the model is given, in the training process)."""
    import json

    from tests.conftest import tiny_recipe
    from toolkit.cli import main

    recipe = tiny_recipe(tmp_path, tiny_data, train={"batch_size": 2})
    out = tmp_path / "bench.json"
    assert main(["bench", str(recipe), "--steps", "2", "--warmup", "1", "--lengths", "20:40", "--isolation", "none",
                 "--no-recipe", "--json", str(out), "--compare", "images: bench.image_tiles=1 data.image_workers=1"]) == 0
    (result,) = json.loads(out.read_text(encoding="utf-8"))["results"]
    assert result["measured_steps"] == 2 and len(result["step_real_tokens"]) == 2
    assert all(20 * 2 <= tokens <= 40 * 2 for tokens in result["step_real_tokens"])
    assert result["images_s"] > 0


def test_bench_from_python_measures_what_the_command_measures(tmp_path, tiny_data, capsys):
    """The same setups on the same synthetic rows: the same tokens per step, batches and losses; only the clock
    readings differ. Refusals are the command's lines."""
    import json

    from tests.conftest import tiny_recipe
    from toolkit import api
    from toolkit.cli import main

    recipe = tiny_recipe(tmp_path, tiny_data, train={"batch_size": 2})
    flags = {"steps": 2, "warmup": 1, "lengths": "20:40", "losses": True, "isolation": "none"}
    ours = api.bench(recipe, compare=["lr: train.learning_rate=0.01"], overrides=["train.seed=3"], **flags)
    out = tmp_path / "bench.json"
    assert main(["bench", str(recipe), "--steps", "2", "--warmup", "1", "--lengths", "20:40", "--losses",
                 "--isolation", "none", "--json", str(out), "--compare", "lr: train.learning_rate=0.01",
                 "--set", "train.seed=3"]) == 0
    theirs = json.loads(out.read_text(encoding="utf-8"))
    assert {k: v for k, v in ours.items() if k != "results"} == {"lengths": "20:40", "steps": 2, "warmup": 1}
    assert [r["setup"] for r in ours["results"]] == [r["setup"] for r in theirs["results"]] == ["lr", "recipe"]
    assert ours["results"][0]["overrides"] == ["train.learning_rate=0.01", "train.seed=3"]
    for mine, command in zip(ours["results"], theirs["results"]):
        assert set(mine) == set(command) and "error" not in mine
        for key in ("overrides", "batch", "grad_accum", "measured_steps", "step_real_tokens", "warmup_lengths",
                    "fused_layers", "checkpoint_layers"):
            assert mine[key] == command[key], key
        assert mine["losses"] == pytest.approx(command["losses"], rel=1e-5)
    capsys.readouterr()
    for bad, flag, message in (({"steps": 0}, ["--steps", "0"], "--steps must be at least 1 and --warmup at least 0"),
                               ({"compare": ["x: bench.timeout=5"]}, ["--compare", "x: bench.timeout=5"],
                                "bench.timeout needs --isolation process (a setup in this process cannot be stopped)"),
                               ({"compare": ["train.batch_size=3"]}, ["--compare", "train.batch_size=3"],
                                "--compare expects 'original' or 'LABEL: key=value ...', got 'train.batch_size=3'")):
        with pytest.raises(ToolkitError) as refused:
            api.bench(recipe, **{**flags, **bad})
        assert str(refused.value) == message
        assert main(["bench", str(recipe), "--isolation", "none", "--json", str(tmp_path / "no.json"), *flag]) == 2
        assert " ".join(capsys.readouterr().out.split()) == f"error: {message}"
    assert not (tmp_path / "no.json").exists()


def test_a_failed_setup_shows_its_first_line_and_logs_its_whole_traceback(monkeypatch, capsys):
    from toolkit.bench import harness

    def fails(*args):
        raise AssertionError("from user code:\n   File \"layer.py\", line 3, in forward\n     eps.to(float)")

    monkeypatch.setattr(harness, "measure", fails)
    assert harness.measure_safely() == {"error": "AssertionError: from user code:"}
    err = capsys.readouterr().err
    assert err.startswith("setup failed: AssertionError\nTraceback (most recent call last):")
    assert 'File "layer.py", line 3, in forward' in err and "eps.to(float)" in err
