"""Offloaded and partial gradient checkpointing (toolkit.training.activations), regional compilation (toolkit.training.compiling), and
what the memory plan, validate and bench say about them."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import tiny_recipe
from toolkit import api
from toolkit.cli import main
from toolkit.config.recipe import LoraSection, TrainSection
from toolkit.errors import ToolkitError
from toolkit.model import fastlora, loading, lora
from toolkit.training import activations, memory

IDS = torch.arange(48).reshape(2, 24) * 7 % 900


def tiny_peft_model():
    """The built-in model (3 self-attention layers, 1 cross-attention layer) with LoRA dropout, B matrices made
    non-zero so every adapter shapes the loss and every gradient."""
    from peft import get_peft_model

    config = loading.load_config("builtin:tiny-mllama")
    torch.manual_seed(0)
    model = get_peft_model(loading.model_class(config).from_config(config),
                           lora.to_lora_config(LoraSection(dropout=0.1)))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    return model.train()


def train_step(checkpointing: bool, offload=False, layers=None, reentrant=False):
    """One forward and backward through the fused LoRA layers, as the Trainer runs them."""
    model = tiny_peft_model()
    applied = None
    if checkpointing:
        model.get_base_model().activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": reentrant})
        applied = activations.apply(model, offload, layers)
    torch.manual_seed(1)  # the dropout masks
    with fastlora.fused_layers(model, lora=True, int8_dequantize=False):
        loss = model(input_ids=IDS, labels=IDS).loss
        loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, applied, model


@pytest.mark.parametrize("reentrant", [False, True])
def test_offloaded_and_partial_checkpointing_give_the_losses_and_gradients_of_plain_checkpointing(reentrant):
    plain = train_step(True, reentrant=reentrant)
    assert plain[1] and all(g.abs().sum() > 0 for g in plain[1].values())
    for offload, layers in [(True, None), (True, 1), (False, 1), (False, 0)]:
        other = train_step(True, offload, layers, reentrant)
        assert other[0] == plain[0]
        assert other[1].keys() == plain[1].keys()
        assert all(torch.equal(other[1][n], g) for n, g in plain[1].items()), (offload, layers)
    no_checkpointing = train_step(False)
    assert no_checkpointing[0] == plain[0]
    assert all(torch.equal(no_checkpointing[1][n], g) for n, g in plain[1].items())


def test_offload_moves_exactly_the_checkpointed_layer_inputs():
    _, _, applied, model = train_step(True, offload=True)
    hidden = model.get_base_model().config.get_text_config().hidden_size
    one_input = IDS.numel() * hidden * 4  # fp32 on the CPU
    assert applied["checkpointed"] == 3 and applied["text_layers"] == 3
    assert applied["hooks"].stats == {"tensors": 3, "bytes": 3 * one_input, "fetched": 3, "prefetched": 0,
                                      "peak_host_bytes": 3 * one_input}
    _, _, partial, _ = train_step(True, offload=True, layers=1)
    assert partial["checkpointed"] == 1 and partial["hooks"].stats["tensors"] == 1


def test_offloaded_tensors_are_separate_copies_and_small_ones_stay():
    hooks = activations.HostOffload(min_bytes=64)
    big, small = torch.randn(4, 8), torch.randn(2)
    packed = hooks.pack(big)
    assert isinstance(packed, activations.Saved) and packed.host.data_ptr() != big.data_ptr()
    assert torch.equal(hooks.unpack(packed), big)
    assert hooks.pack(small) is small and hooks.unpack(small) is small


def test_host_buffers_are_reused_whatever_the_size_and_replace_the_largest_too_small():
    pool = activations.PinnedBuffers(pin=False)
    a, b = pool.take(3000), pool.take(5000)
    assert (a.numel(), b.numel(), pool.allocations, pool.held_bytes) == (4096, 8192, 2, 12288)
    pool.give_back(a)
    pool.give_back(b)
    assert pool.take(1000) is a  # the smallest that fits
    assert pool.take(1000).numel() == 8192 and pool.allocations == 2  # a larger one rather than a new one
    pool.give_back(a)
    c = pool.take(20000)  # nothing fits: a new 32 KiB buffer takes the place of the 4 KiB one
    assert c.numel() == 32768 and pool.allocations == 3 and pool.free == []
    assert pool.held_bytes == 8192 + 32768 and pool.peak_held_bytes == 8192 + 32768


def test_offload_reuses_its_host_buffers_from_step_to_step_and_live_tensors_never_share_one():
    hooks = activations.HostOffload(min_bytes=64)
    first = [hooks.pack(torch.randn(16, 8)) for _ in range(3)]
    pointers = {saved.host.data_ptr() for saved in first}
    assert len(pointers) == 3  # held at once: three buffers
    values = [hooks.unpack(saved) for saved in first]
    assert values[0].data_ptr() not in pointers  # unpack hands out a copy, not the buffer
    del first
    second = [hooks.pack(torch.randn(8, 8)) for _ in range(3)]  # a shorter step: the same buffers, none new
    assert {saved.host.data_ptr() for saved in second} == pointers
    assert hooks.buffer_stats() == {"pinned_bytes": 3 * 512, "peak_pinned_bytes": 3 * 512, "allocations": 3}
    assert torch.equal(values[0], values[0].clone())  # the earlier copies were not overwritten


def test_a_training_step_after_the_first_allocates_no_host_buffer():
    model = tiny_peft_model()
    model.get_base_model().activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    hooks = activations.apply(model, True, None)["hooks"]
    with fastlora.fused_layers(model, lora=True, int8_dequantize=False):
        for ids in (IDS, IDS[:, :16], IDS[:1]):  # the longest first, as length grouping orders them
            model(input_ids=ids, labels=ids).loss.backward()
    hidden = model.get_base_model().config.get_text_config().hidden_size
    block = memory.pinned_block_bytes(IDS.numel() * hidden * 4)
    assert hooks.stats["tensors"] == 9
    assert hooks.buffer_stats() == {"pinned_bytes": 3 * block, "peak_pinned_bytes": 3 * block, "allocations": 3}


def test_layers_are_spread_evenly_and_chosen_on_the_model():
    assert activations.spread(16, 32) == [False, True] * 16
    assert activations.spread(0, 4) == [False] * 4 and activations.spread(4, 4) == [True] * 4
    assert activations.spread(2, 5) == [False, False, True, False, True]
    _, _, _, model = train_step(True, layers=1)
    flags = [layer.gradient_checkpointing for layer in activations.text_decoder_layers(model)]
    assert flags == [False, False, True]
    cross = model.get_base_model().model.language_model.layers[2]
    assert "CrossAttention" in type(cross).__name__ and cross.gradient_checkpointing  # untouched


def test_refusals():
    model = tiny_peft_model()
    with pytest.raises(ToolkitError, match="gradient checkpointing is not on in this model"):
        activations.apply(model, True, None)
    model.get_base_model().activation_checkpointing_enable()
    with pytest.raises(ToolkitError, match=r"train.checkpoint_layers=4, but the model has 3 self-attention"):
        activations.apply(model, False, 4)
    with pytest.raises(ValueError, match="checkpoint_layers=3 needs gradient_checkpointing: true or offload"):
        TrainSection(checkpoint_layers=3)
    with pytest.raises(ValueError, match=r"give a number of layers \(0 or more\), all or auto \(got -1\)"):
        TrainSection(gradient_checkpointing=True, checkpoint_layers=-1)
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        TrainSection(gradient_checkpointing="offlaod")
    with pytest.raises(ValueError, match="compile=true cannot trace Liger's kernels in the decoder layers"):
        TrainSection(compile=True, liger_kernel=True)
    assert TrainSection(compile=True, liger_kernel=False).compile


# ---- memory ----


@pytest.fixture(scope="module")
def full_size():
    from toolkit.bench.harness import full_size_config

    config = full_size_config()
    return loading.meta_model(config), config.get_text_config()


def test_offload_keeps_two_layer_inputs_on_the_gpu_and_the_rest_in_host_memory(full_size):
    _, text = full_size
    h, layers = text.hidden_size, memory.text_layers(text)
    plain = memory.Setup(liger=True, checkpointing=True)
    offload = memory.Setup(liger=True, checkpointing=True, offload=True)
    saved = memory.activation_bytes_per_token(text, plain) - memory.activation_bytes_per_token(text, offload)
    assert saved == (layers - memory.OFFLOAD_IN_FLIGHT) * 2 * h
    # 64 rows of 376 tokens: 188 MiB per layer input, each in a 256 MiB pinned block
    assert memory.host_bytes(text, offload, 64, 376) == layers * 256 * 2**20
    assert memory.host_bytes(text, offload, 64, 256) == layers * 128 * 2**20  # exactly 128 MiB
    assert memory.host_bytes(text, plain, 64, 376) == 0
    assert [memory.pinned_block_bytes(n) for n in (1, 2, 3, 4096, 4097)] == [1, 2, 4, 4096, 8192]


def test_unchecked_layers_keep_their_activations(full_size):
    _, text = full_size
    layer = memory.layer_bytes_per_token(text, memory.Setup(liger=True))
    all_of_them = memory.activation_bytes_per_token(text, memory.Setup(liger=True, checkpointing=True))
    eight_free = memory.activation_bytes_per_token(text, memory.Setup(liger=True, checkpointing=True,
                                                                      checkpoint_layers=24))
    assert eight_free - all_of_them == 8 * layer - 8 * 2 * text.hidden_size
    none = memory.activation_bytes_per_token(text, memory.Setup(liger=True, checkpointing=True, checkpoint_layers=0))
    assert none == memory.activation_bytes_per_token(text, memory.Setup(liger=True))


def test_auto_layers_are_the_fewest_that_fit(full_size):
    meta, text = full_size
    setup = memory.Setup(liger=True, checkpointing=True, offload=True)
    plan = memory.plan_batch(meta, text, setup, 370, 40, 1000, batch=64, auto_layers=True)
    assert plan.batch_size == 64 and 0 < plan.checkpoint_layers < 32
    assert plan.peak_gib() <= 40
    fewer = memory.plan_batch(meta, text, memory.Setup(liger=True, checkpointing=True, offload=True,
                                                       checkpoint_layers=plan.checkpoint_layers - 1),
                              370, 40, 1000, batch=64)
    assert fewer.peak_gib() > 40
    with pytest.raises(ToolkitError, match="train.checkpoint_layers: auto finds no layer count with which 64 rows"):
        memory.plan_batch(meta, text, setup, 370, 21, 1000, batch=64, auto_layers=True)


def test_validate_shows_the_memory_of_offloading_and_auto_layers(tmp_path, tiny_data, capsys):
    recipe = tiny_recipe(tmp_path, tiny_data, train={"batch_size": 4})
    assert main(["validate", str(recipe), "--set", "train.gradient_checkpointing=offload",
                 "--set", "train.checkpoint_layers=auto"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "memory: est. peak" in out and "checkpointed layers: 0" in out  # the tiny model fits without any
    assert "GiB of layer inputs in host memory" in out
    assert main(["validate", str(recipe), "--set", "train.gradient_checkpointing=offload",
                 "--set", "train.memory_budget_gib=0.0001"]) == 0
    assert "checkpointed layers: all" in " ".join(capsys.readouterr().out.split())


# ---- bench and training ----


def bench(tmp_path, tiny_data, *args, **train):
    recipe = tiny_recipe(tmp_path, tiny_data, train={"batch_size": 2, "group_by_length": True,
                                                     "gradient_checkpointing": True, **train},
                         lora={"dropout": 0.1})
    out = tmp_path / "bench.json"
    code = main(["bench", str(recipe), "--lengths", "20:40", "--json", str(out), *args])
    return code, {r["setup"]: r for r in json.loads(out.read_text(encoding="utf-8"))["results"]}


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_offload_trains_quantized_models_like_plain_checkpointing(tmp_path, tiny_data, bits):
    code, results = bench(tmp_path, tiny_data, "--steps", "1", "--warmup", "1", "--isolation", "none",
                          "--set", f"quantization.mode={bits}",
                          "--compare", "offload: train.gradient_checkpointing=offload",
                          "--compare", "half: train.gradient_checkpointing=offload train.checkpoint_layers=1")
    assert code == 0
    plain, offload, half = results["recipe"], results["offload"], results["half"]
    assert offload["fused_layers"]["lora"] == 16 and len(plain["micro_losses"]) == 2
    assert offload["micro_losses"] == plain["micro_losses"] == half["micro_losses"]
    assert offload["offloaded_tensors_per_step"] == 3 and half["offloaded_tensors_per_step"] == 1
    assert offload["host_pinned_gib"] == pytest.approx(offload["predicted_host_gib"])
    assert offload["host_buffer_allocations"] == 3  # one per layer, in the first step
    # what explains a slow step: each measured step's padded length, and per step (warm-up too) the seconds
    # Python's garbage collector paused (the GPU counters exist only on a GPU)
    assert offload["step_lengths"] == [offload["longest_padded"]]
    assert len(offload["step_gc_s"]) == 2 and all(s >= 0 for s in offload["step_gc_s"])
    assert half["checkpointed_layers"] == 1 and "offloaded_gib_per_step" not in plain


def test_compile_is_regional_and_undone(tmp_path, monkeypatch):
    """Each self-attention layer gets its own compiled call (Dynamo's tracing is too slow for this suite on a CPU:
    the losses of compiled layers are compared on the GPU, scripts/gpu_round3.sh); nothing else is compiled, and
    `uncompile` restores the eager layers."""
    from toolkit.training import compiling

    monkeypatch.setenv("TOOLKIT_CACHE", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    model = tiny_peft_model()
    layers = compiling.compile_layers(model)
    assert len(layers) == 3 and all(layer._compiled_call_impl is not None for layer in layers)
    compiled = [name for name, m in model.named_modules() if m._compiled_call_impl is not None]
    assert compiled == [f"base_model.model.model.language_model.layers.{i}" for i in (0, 1, 3)]
    import os

    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "compile")
    compiling.uncompile(layers)
    assert not any(m._compiled_call_impl is not None for m in model.modules())


def test_a_setup_past_its_time_is_stopped_and_the_rest_skipped(tmp_path, tiny_data):
    code, results = bench(tmp_path, tiny_data, "--steps", "1", "--warmup", "0", "--setup-timeout", "1",
                          "--compare", "first: train.batch_size=1")
    assert code == 1
    assert results["first"]["error"] == "stopped after 1 s (--setup-timeout)"
    assert results["recipe"]["error"] == "stopped after 1 s (--setup-timeout)"
    code, results = bench(tmp_path, tiny_data, "--steps", "1", "--time-limit", "5", "--isolation", "none",
                          "--no-recipe", "--compare", "a: train.batch_size=1", "--compare", "b: train.batch_size=2")
    assert code == 1 and [r["error"] for r in results.values()] == ["skipped: --time-limit 5 s reached"] * 2


def test_bench_checks_every_setup_before_running_any(tmp_path, tiny_data, capsys):
    recipe = tiny_recipe(tmp_path, tiny_data)
    out = tmp_path / "bench.json"
    assert main(["bench", str(recipe), "--isolation", "none", "--json", str(out), "--compare", "a: train.batch_size=1",
                 "--compare", "b: train.gradient_checkpointing=false train.checkpoint_layers=2"]) == 2
    captured = capsys.readouterr()
    assert "checkpoint_layers=2 needs gradient_checkpointing: true or offload" in " ".join((captured.out + captured.err).split())
    assert not out.exists()


def test_sharded_strategies_refuse_offload_before_the_run_directory_exists(tmp_path, tiny_data, capsys):
    recipe = tiny_recipe(tmp_path, tiny_data)
    run_dir = tmp_path / "run"
    assert main(["sft", str(recipe), "--output-dir", str(run_dir), "--strategy", "fsdp",
                 "--set", "train.gradient_checkpointing=offload"]) == 2
    captured = capsys.readouterr()
    assert ("train.gradient_checkpointing: offload, train.checkpoint_layers and train.compile run with --strategy "
            "ddp; --strategy fsdp wraps the layers its own way") in " ".join((captured.out + captured.err).split())
    assert not run_dir.exists()


def test_sft_trains_with_auto_settings_resolved_and_says_so(tmp_path, tiny_data, capsys):
    recipe = tiny_recipe(tmp_path, tiny_data, train={"max_steps": 1, "batch_size": "auto",
                                                     "gradient_checkpointing": "offload", "checkpoint_layers": "auto"})
    run_dir = tmp_path / "run"
    assert main(["sft", str(recipe), "--output-dir", str(run_dir)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "train.batch_size: auto -> 12; train.checkpoint_layers: auto -> 0; memory: est. peak" in out
    saved = (run_dir / "recipe.yaml").read_text(encoding="utf-8")
    assert "checkpoint_layers: 0" in saved and "batch_size: 12" in saved and "gradient_checkpointing: offload" in saved


def test_sft_refuses_offload_that_would_not_fit_the_hosts_free_memory(tmp_path, tiny_data, capsys, monkeypatch):
    recipe = tiny_recipe(tmp_path, tiny_data, train={"batch_size": 4, "gradient_checkpointing": "offload"})
    prepared = api.plan(recipe)
    hidden, longest = prepared.model_config.get_text_config().hidden_size, max(prepared.lengths)
    # 3 layer inputs of 4 rows as long as the longest (padded to 8), fp32, each in a power-of-two block
    need = 3 * memory.pinned_block_bytes(4 * -(-longest // 8) * 8 * hidden * 4)
    memory.check_host_memory(prepared, available=need)  # exactly enough: fine
    with pytest.raises(ToolkitError, match=r"\(2 training processes\)"):
        memory.check_host_memory(prepared, processes=2, available=need)
    monkeypatch.setattr(memory, "available_host_bytes", lambda: need - 2**20 // 100)
    run_dir = tmp_path / "run"
    assert main(["sft", str(recipe), "--output-dir", str(run_dir)]) == 2
    refusal = (f"train.gradient_checkpointing=offload keeps about {need / 2**20:.2f} MiB of layer inputs in host "
               f"memory for 4 rows of up to {longest} tokens, but this machine has "
               f"{(need - 2**20 // 100) / 2**20:.2f} MiB available; lower train.batch_size or use "
               "train.gradient_checkpointing: true")
    assert refusal in " ".join(capsys.readouterr().out.split())
    assert not run_dir.exists()
    with pytest.raises(ToolkitError, match="layer inputs in host memory"):
        api.train(prepared, tmp_path / "api-run")
    assert not (tmp_path / "api-run").exists()
    # a node of a multi-machine job is refused the same way, before it waits for the other nodes
    assert main(["sft", str(recipe), "--output-dir", str(run_dir), "--nodes", "2", "--node-rank", "0",
                 "--master-addr", "127.0.0.1", "--join-timeout", "600"]) == 2
    assert refusal in " ".join(capsys.readouterr().out.split()) and not run_dir.exists()
    plain = api.plan(tiny_recipe(tmp_path, tiny_data, train={"batch_size": 4, "gradient_checkpointing": True}))
    memory.check_host_memory(plain, available=0)  # nothing offloaded, nothing to check


def test_available_host_memory_is_read_from_meminfo():
    available = memory.available_host_bytes()
    assert available is not None and available > 2**20
