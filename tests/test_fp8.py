"""`train.fp8_matmuls`: frozen-weight matmuls through e4m3 with one scale per row (toolkit.model.fp8), run inside the
fused LoRA and frozen layers (toolkit.model.fastlora) of the decoder's self-attention layers.

PyTorch's `_scaled_mm` runs on the CPU too, so the arithmetic, the wiring and the scope are checked here; the Triton
kernel that quantizes rows on a GPU is checked against `reference_rows` by scripts/gpu_fp8_check.py.
"""

from __future__ import annotations

import pytest
import torch

from tests.test_fastlora import tiny_peft_model
from toolkit.config.precision import Accelerator
from toolkit.config.recipe import recipe_from_dict
from toolkit.errors import ToolkitError
from toolkit.model import fastlora, fp8
from toolkit.training import activations, prepare

E4M3_STEP = 2.0 ** -3  # e4m3 keeps 3 mantissa bits: rounding moves a normal value by at most half a step of 2^-3


def dequantized(rows, scale):
    return rows.float() * scale


def test_each_row_is_scaled_so_its_largest_magnitude_is_e4m3s_largest():
    x = torch.tensor([[1.0, -2.0, 0.5, 0.25], [300.0, 1.0, -600.0, 0.001], [0.0, 0.0, 0.0, 0.0]])
    rows, scale = fp8.reference_rows(x)
    assert rows.dtype == torch.float8_e4m3fn and scale.shape == (3, 1) and scale.dtype == torch.float32
    assert scale[:, 0].tolist() == pytest.approx([2.0 / 448, 600.0 / 448, 1e-12 / 448], rel=1e-6)
    assert rows.float().abs().amax(dim=1).tolist() == [448.0, 448.0, 0.0]
    assert rows[0].float().tolist() == [224.0, -448.0, 112.0, 56.0]  # powers of two survive exactly
    back = dequantized(rows, scale)
    assert torch.all((back - x).abs() <= E4M3_STEP / 2 * x.abs() + 2.0 ** -9 * scale)  # 2^-9: e4m3's subnormal step


def test_off_the_gpu_rows_are_quantized_by_the_reference():
    x = torch.randn(40, 64, dtype=torch.bfloat16)
    rows, scale = fp8.quantize_rows(x)
    expected_rows, expected_scale = fp8.reference_rows(x)
    assert torch.equal(rows.view(torch.uint8), expected_rows.view(torch.uint8)) and torch.equal(scale, expected_scale)


def test_linear_is_the_product_of_the_dequantized_rows():
    torch.manual_seed(0)
    x, weight, bias = torch.randn(24, 64), torch.randn(48, 64) / 8, torch.randn(48)
    x, weight, bias = x.bfloat16(), weight.bfloat16(), bias.bfloat16()
    out = fp8.linear(x, weight, bias)
    expected = dequantized(*fp8.reference_rows(x)) @ dequantized(*fp8.reference_rows(weight)).t() + bias.float()
    assert out.dtype == torch.bfloat16 and out.shape == (24, 48)
    assert torch.allclose(out.float(), expected, rtol=1e-2, atol=1e-2)
    exact = x.float() @ weight.float().t() + bias.float()
    error = ((out.float() - exact).norm() / exact.norm()).item()
    assert 1e-3 < error < 0.05  # through e4m3: near the exact product, not equal to it


def test_input_grad_scales_the_weight_by_columns():
    """g @ W keeps W's columns, so each column gets its own scale: a column a thousand times larger than the others
    leaves them their precision (one scale per row of W would round them all to zero)."""
    torch.manual_seed(0)
    grad, weight = torch.randn(16, 32).bfloat16(), torch.randn(32, 48)
    weight[:, 0] *= 1000
    weight = weight.bfloat16()
    out = fp8.input_grad(grad, weight).float()
    exact = grad.float() @ weight.float()
    per_column = (out - exact).norm(dim=0) / exact.norm(dim=0)
    assert out.shape == (16, 48) and per_column.max().item() < 0.08


def test_shared_inputs_are_quantized_once_per_layer(monkeypatch):
    """q, k and v read one tensor and gate and up another: each is quantized once, so a text layer quantizes four
    activations (attention input, o's input, MLP input, down's input) where seven modules multiply."""
    model = tiny_peft_model().to(torch.bfloat16)
    layers = activations.text_decoder_layers(model)
    tokens = 24
    seen = []
    quantize = fp8.quantize_rows
    monkeypatch.setattr(fp8, "quantize_rows", lambda x: seen.append(x.shape[0]) or quantize(x))
    ids = torch.arange(tokens).reshape(2, 12) * 7 % 900
    with fastlora.fused_layers(model, lora=True, int8_dequantize=False, frozen_dense=True, fp8="forward",
                               fp8_layers=layers) as counts:
        model(input_ids=ids, labels=ids).loss.backward()
    assert seen.count(tokens) == 4 * len(layers)
    assert len(seen) - seen.count(tokens) == 7 * len(layers)  # the weights, once each
    assert counts["fp8"] == 4 * len(layers) + 7 * len(layers)  # 4 LoRA layers and the 7 frozen ones under them


def test_an_input_changed_in_place_is_quantized_again():
    cache = fp8.LastInput()
    x = torch.randn(8, 32)
    first = cache.get(x, x)
    assert cache.get(x, x) is first
    x.mul_(3)
    again = cache.get(x, x)
    assert again is not first and torch.allclose(again[1], first[1] * 3)
    other = x.clone()
    assert cache.get(other, other) is not again


def test_only_the_text_decoder_layers_multiply_in_fp8():
    model = tiny_peft_model()
    mode = fastlora.fp8_scope(activations.text_decoder_layers(model), "all")
    modes = {name: mode(module) for name, module in model.named_modules()
             if isinstance(module, torch.nn.Linear) or hasattr(module, "lora_A")}
    in_fp8 = {name for name, m in modes.items() if m == "all"}
    assert in_fp8 and all(".layers." in name and "vision" not in name for name in in_fp8)
    assert modes["base_model.model.lm_head"] == "none"
    assert any("vision" in name for name, m in modes.items() if m == "none")
    cross = [name for name in modes if "cross_attn." in name]
    assert cross and all(modes[name] == "none" for name in cross)
    assert fastlora.fp8_scope(activations.text_decoder_layers(model), "none")(model.base_model.model.lm_head) == "none"


def fused_step(model, fp8_mode: str):
    layers = activations.text_decoder_layers(model)
    ids = torch.arange(24).reshape(2, 12) * 7 % 900
    model.zero_grad()
    torch.manual_seed(1)
    with fastlora.fused_layers(model, lora=True, int8_dequantize=False, frozen_dense=True, fp8=fp8_mode,
                               fp8_layers=layers):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fp8_mode", ["forward", "all"])
def test_fp8_training_steps_stay_close_to_bf16(fp8_mode):
    model = tiny_peft_model(dropout=0.1).to(torch.bfloat16)
    plain, through_fp8 = fused_step(model, "none"), fused_step(model, fp8_mode)
    assert through_fp8[0] != plain[0] and through_fp8[0] == pytest.approx(plain[0], rel=0.01)
    assert through_fp8[1].keys() == plain[1].keys() and plain[1]
    for name, grad in plain[1].items():
        cosine = torch.nn.functional.cosine_similarity(grad.flatten(), through_fp8[1][name].flatten(), dim=0)
        assert cosine > 0.95, name


def one_lora_layer(p: float):
    from peft import LoraConfig, get_peft_model

    from tests.test_fastlora import OneLayer

    torch.manual_seed(0)
    model = get_peft_model(OneLayer(torch.nn.Linear(64, 48)), LoraConfig(r=4, lora_alpha=8, lora_dropout=p,
                                                                         target_modules=["proj"]))
    model = model.to(torch.bfloat16).train()
    model.base_model.model.proj.lora_B["default"].weight.data.normal_(0, 0.05)
    for param in model.base_model.model.proj.base_layer.parameters():
        param.requires_grad_(False)
    return model


@pytest.mark.parametrize("p", [0.0, 0.2])
def test_a_lora_layer_multiplies_its_base_in_fp8_forward_and_in_backward_only_when_asked(p):
    """forward: the base product is fp8.linear's, the input gradient the bf16 one; all: the input gradient is
    fp8.input_grad's too; the adapter's terms are the same in every mode."""
    model = one_lora_layer(p)
    proj = model.base_model.model.proj
    weight, bias = proj.base_layer.weight, proj.base_layer.bias
    x = torch.randn(2, 12, 64, dtype=torch.bfloat16)
    results = {}
    for mode in ("none", "forward", "all"):
        leaf = x.clone().requires_grad_(True)
        torch.manual_seed(3)
        with fastlora.fused_layers(model, lora=True, int8_dequantize=False, fp8=mode, fp8_layers=[model]):
            out = model(leaf)
            out.backward(torch.ones_like(out))
        results[mode] = out.detach().float(), leaf.grad.float()
    flat = x.reshape(-1, 64)
    base_bf16 = torch.nn.functional.linear(flat, weight, bias).float()
    base_fp8 = fp8.linear(flat, weight, bias).float()
    adapter = results["none"][0].reshape(-1, 48) - base_bf16
    assert torch.allclose(results["forward"][0].reshape(-1, 48), base_fp8 + adapter, atol=2e-2)
    assert not torch.allclose(base_fp8, base_bf16, atol=1e-3)
    ones = torch.ones(24, 48, dtype=torch.bfloat16)
    grad_bf16 = (ones @ weight).float()
    grad_fp8 = fp8.input_grad(ones, weight).float()
    assert torch.allclose(results["forward"][1], results["none"][1], atol=1e-6)
    adapter_grad = results["none"][1].reshape(-1, 64) - grad_bf16
    assert torch.allclose(results["all"][1].reshape(-1, 64), grad_fp8 + adapter_grad, atol=3e-2)
    assert not torch.allclose(grad_fp8, grad_bf16, atol=1e-3)


def test_frozen_4bit_layers_multiply_in_fp8_and_stay_with_bitsandbytes_otherwise():
    """The MLP of a 4-bit model with LoRA on attention is frozen 4-bit layers: with FP8 they run dequantized through
    the FP8 product (and keep nothing); without it bitsandbytes' own layer runs, as before."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnb_functional

    from tests.test_fastlora import OneLayer

    torch.manual_seed(0)
    layer = bnb.nn.Linear4bit(32, 16, bias=False, compute_dtype=torch.bfloat16)
    layer.load_state_dict({"weight": torch.randn(16, 32)})
    model = OneLayer(layer.to("cpu"))
    x = torch.randn(2, 6, 32, dtype=torch.bfloat16, requires_grad=True)
    with fastlora.fused_layers(model, lora=False, int8_dequantize=False, fp8="forward", fp8_layers=[model]) as counts:
        out = model(x)
        out.sum().backward()
    weight = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    assert counts["nf4"] == 1 and counts["fp8"] == 1
    assert torch.equal(out.reshape(-1, 16), fp8.linear(x.detach().reshape(-1, 32), weight))
    assert torch.allclose(x.grad.reshape(-1, 32), torch.ones(12, 16, dtype=torch.bfloat16) @ weight)
    with fastlora.fused_layers(model, lora=False, int8_dequantize=False) as counts:
        assert counts["nf4"] == 0 and "forward" not in vars(layer)


def fp8_recipe(**train):
    return recipe_from_dict({"model": {"name": "builtin:tiny-mllama"}, "data": {"train": "unused.jsonl"},
                             "train": {"fp8_matmuls": "forward", **train}})


def test_fp8_is_refused_without_a_gpu_that_multiplies_fp8():
    with pytest.raises(ToolkitError) as refused:
        prepare.check_fp8(fp8_recipe(), Accelerator(cuda=False, bf16=False), "fp32")
    assert str(refused.value) == ("train.fp8_matmuls=forward needs a CUDA GPU of compute capability 8.9 or later "
                                  "(H100, H200, L40S, ...); this machine: no CUDA GPU; set it to none")
    prepare.check_fp8(fp8_recipe(fp8_matmuls="none"), Accelerator(cuda=False, bf16=False), "fp32")  # accepted


def test_fp8_is_refused_in_fp16_and_where_the_toolkit_layers_do_not_run(monkeypatch):
    monkeypatch.setattr(fp8, "available", lambda: True)
    gpu = Accelerator(cuda=True, bf16=True, name="gpu")
    prepare.check_fp8(fp8_recipe(), gpu, "bf16")  # accepted
    with pytest.raises(ToolkitError) as refused:
        prepare.check_fp8(fp8_recipe(), gpu, "fp16")
    assert str(refused.value) == ("train.fp8_matmuls=forward writes its products in bf16; train.precision is fp16: "
                                  "use bf16 or auto, or set fp8_matmuls: none")
    with pytest.raises(ToolkitError) as refused:
        prepare.check_fp8(fp8_recipe(fused_lora=False), gpu, "bf16")
    assert str(refused.value) == ("train.fp8_matmuls=forward runs inside the toolkit's LoRA layers; set "
                                  "train.fused_lora: true or fp8_matmuls: none")
    upcast = recipe_from_dict({"model": {"name": "builtin:tiny-mllama"}, "data": {"train": "unused.jsonl"},
                               "train": {"fp8_matmuls": "all"}, "lora": {"upcast_inputs": True}})
    assert fastlora.fp8_problem(upcast) == ("train.fp8_matmuls=all runs inside the toolkit's LoRA layers, which "
                                            "lora.upcast_inputs turns off; set one of them off")
    int8 = recipe_from_dict({"model": {"name": "builtin:tiny-mllama"}, "data": {"train": "unused.jsonl"},
                             "train": {"fp8_matmuls": "all"},
                             "quantization": {"mode": "8bit", "int8_matmul": "int8"}})
    assert fastlora.fp8_problem(int8) == ("train.fp8_matmuls=all needs quantization.int8_matmul: dequantize "
                                          "(LLM.int8() runs its own matmul)")
    assert fastlora.fp8_problem(fp8_recipe(), "fsdp") == ("train.fp8_matmuls=forward needs whole weights in every "
                                                          "process; fsdp shards them: set it to none")


def test_fp8_runs_frozen_dense_layers_through_the_toolkit_without_checkpointing():
    on = fastlora.paths_on(fp8_recipe())
    assert on["fp8"] == "forward" and on["frozen_dense"] is True
    off = fastlora.paths_on(fp8_recipe(fp8_matmuls="none"))
    assert off["fp8"] == "none" and off["frozen_dense"] is False
    assert fastlora.paths_on(fp8_recipe(), "fsdp")["fp8"] == "none"


def test_validate_says_when_matmuls_run_in_fp8(tmp_path, tiny_data, capsys, monkeypatch):
    from conftest import tiny_recipe

    from toolkit.cli import main

    monkeypatch.setattr(prepare, "check_fp8", lambda *args: None)  # the plan, not the GPU check, is under test
    recipe = tiny_recipe(tmp_path, tiny_data, train={"fp8_matmuls": "all"})
    assert main(["validate", str(recipe)]) == 0
    assert "none; frozen-weight matmuls in FP8 (all)" in " ".join(capsys.readouterr().out.split())
    assert main(["validate", str(recipe), "--set", "train.fp8_matmuls=none"]) == 0
    assert "FP8" not in capsys.readouterr().out


# ---- frozen weights held in FP8 for the block (all) ----


def held_modules(model):
    inside = {id(m) for layer in activations.text_decoder_layers(model) for m in layer.modules()}
    return {name: module for name, module in model.named_modules()
            if id(module) in inside and type(module) is torch.nn.Linear and not module.weight.requires_grad}


def step_recording(model, record=None):
    """fused_step's step with `all`, recording the rows of every tensor quantized after the block is entered."""
    layers = activations.text_decoder_layers(model)
    ids = torch.arange(24).reshape(2, 12) * 7 % 900
    model.zero_grad()
    torch.manual_seed(1)
    with fastlora.fused_layers(model, lora=True, int8_dequantize=False, frozen_dense=True, fp8="all",
                               fp8_layers=layers) as counts:
        if record is not None:
            record(counts)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    return loss.item(), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}


def test_all_quantizes_each_frozen_weight_once_and_trains_exactly_as_quantizing_every_pass(monkeypatch):
    """With `all` a frozen bf16 weight is needed only in e4m3: it is quantized when the block starts, the step
    quantizes only activations and gradients (24 rows each here), and loss and gradients are bit for bit those of
    quantizing the weight in every pass; the bf16 weights are emptied for the block and come back unchanged."""
    model = tiny_peft_model(dropout=0.1).to(torch.bfloat16)
    modules = held_modules(model)
    before = {name: module.weight.detach().clone() for name, module in modules.items()}
    assert len(modules) == 7 * 3  # q, k, v, o (LoRA's base layers), gate, up, down in 3 self-attention layers
    with monkeypatch.context() as patch:
        patch.setattr(fastlora, "holdable", lambda module, mode: False)
        every_pass = step_recording(model)
    rows = []
    quantize = fp8.quantize_rows

    def record(counts):
        assert counts["fp8_held"] == len(modules) and counts["fp8"] == 4 * 3 + 7 * 3
        assert all(module.weight.numel() == 0 and fastlora.resident(module) is not None
                   for module in modules.values())
        monkeypatch.setattr(fp8, "quantize_rows", lambda x: rows.append(x.shape[0]) or quantize(x))

    held = step_recording(model, record)
    assert rows and set(rows) == {24}
    assert held[0] == every_pass[0] and held[1].keys() == every_pass[1].keys()
    assert all(torch.equal(held[1][name], grad) for name, grad in every_pass[1].items())
    for name, module in modules.items():
        assert torch.equal(module.weight, before[name]) and fastlora.RESIDENT not in vars(module), name


def test_a_pass_without_gradients_runs_on_the_held_weights():
    """Evaluation and sample answers during training run without gradients (samples in inference mode), through
    PEFT's own forward: the held layers answer them from their e4m3 copies (their bf16 weights are away), as the
    step with gradients does."""
    model = tiny_peft_model().to(torch.bfloat16).eval()
    ids = torch.arange(24).reshape(2, 12) * 7 % 900
    layers = activations.text_decoder_layers(model)
    with fastlora.fused_layers(model, lora=True, int8_dequantize=False, frozen_dense=True, fp8="all",
                               fp8_layers=layers) as counts:
        assert counts["fp8_held"] == 21
        with_grads = model(input_ids=ids, labels=ids).loss.item()
        with torch.no_grad():
            without = model(input_ids=ids, labels=ids).loss.item()
        with torch.inference_mode():  # as sample answers during training run
            inferred = model(input_ids=ids, labels=ids).loss.item()
    with torch.no_grad():
        bf16 = model(input_ids=ids, labels=ids).loss.item()
    assert without == pytest.approx(with_grads, rel=2e-3) and without != bf16
    assert inferred == without


def test_held_weights_come_back_when_training_fails():
    model = tiny_peft_model().to(torch.bfloat16)
    modules = held_modules(model)
    before = {name: module.weight.detach().clone() for name, module in modules.items()}
    layers = activations.text_decoder_layers(model)
    with pytest.raises(RuntimeError, match="the step failed"), \
            fastlora.fused_layers(model, lora=True, int8_dequantize=False, frozen_dense=True, fp8="all",
                                  fp8_layers=layers):
        raise RuntimeError("the step failed")
    for name, module in modules.items():
        assert torch.equal(module.weight, before[name]) and fastlora.RESIDENT not in vars(module)
        assert "forward" not in vars(module)


def test_a_failure_while_holding_leaves_every_weight_as_it_was(monkeypatch):
    """Holding runs layer by layer before training starts; if one fails (no GPU memory for the e4m3 copies, no host
    memory for the bf16 matrix), the layers held before it get their weights back and none keeps an e4m3 copy."""
    model = tiny_peft_model().to(torch.bfloat16)
    modules = held_modules(model)
    before = {name: module.weight.detach().clone() for name, module in modules.items()}
    layers = activations.text_decoder_layers(model)
    for failing, step in ((fp8, "ResidentWeight"), (fastlora, "set_aside")):  # the e4m3 copies, the host copy
        made = []
        original = getattr(failing, step)

        def fifth_fails(weight, original=original, made=made):
            made.append(weight.shape)
            if len(made) == 5:
                raise torch.OutOfMemoryError("no memory for the fifth")
            return original(weight)

        monkeypatch.setattr(failing, step, fifth_fails)
        with pytest.raises(torch.OutOfMemoryError), \
                fastlora.fused_layers(model, lora=True, int8_dequantize=False, frozen_dense=True, fp8="all",
                                      fp8_layers=layers):
            pass
        monkeypatch.undo()
        assert len(made) == 5, step
        for name, module in modules.items():
            assert torch.equal(module.weight, before[name]) and fastlora.RESIDENT not in vars(module), (step, name)
            assert "forward" not in vars(module)


def test_only_all_over_16_bit_frozen_weights_is_held():
    """`forward` needs the bf16 weight for backward's input gradient, an fp32 weight would be quantized from other
    values than the per-pass path's, and a weight being trained changes every step."""
    model = tiny_peft_model().to(torch.bfloat16)
    layers = activations.text_decoder_layers(model)
    for mode in ("forward", "none"):
        with fastlora.fused_layers(model, lora=True, int8_dequantize=False, frozen_dense=True, fp8=mode,
                                   fp8_layers=layers) as counts:
            assert counts["fp8_held"] == 0
    linear = torch.nn.Linear(32, 16).requires_grad_(False)
    assert not fastlora.holdable(linear, "all")  # fp32
    assert fastlora.holdable(linear.to(torch.bfloat16), "all") and not fastlora.holdable(linear, "forward")
    linear.bias.requires_grad_(True)
    assert not fastlora.holdable(linear, "all")


@pytest.fixture(scope="module")
def full_size_text():
    from toolkit.bench.harness import full_size_config

    return full_size_config().get_text_config()


def test_the_host_memory_of_held_weights_is_counted_and_checked(full_size_text, tmp_path, tiny_data, monkeypatch):
    from dataclasses import replace

    from conftest import tiny_recipe

    from toolkit import api
    from toolkit.training import memory

    held = memory.Setup(fp8_held=True)
    # 32 self-attention layers x (q, o: 4096 x 4096; k, v: 4096 x 1024; gate, up, down: 4096 x 14336) x 2 bytes
    assert memory.held_weight_bytes(full_size_text, held) == 32 * 218_103_808 * 2
    assert memory.held_weight_bytes(full_size_text, memory.Setup()) == 0
    assert memory.Setup.from_recipe(fp8_recipe(fp8_matmuls="all"), "bf16").fp8_held
    assert not memory.Setup.from_recipe(fp8_recipe(fp8_matmuls="forward"), "bf16").fp8_held
    assert not memory.Setup.from_recipe(fp8_recipe(fp8_matmuls="all"), "bf16", "fsdp").fp8_held
    four_bit = recipe_from_dict({"model": {"name": "builtin:tiny-mllama"}, "data": {"train": "unused.jsonl"},
                                 "train": {"fp8_matmuls": "all"}, "quantization": {"mode": "4bit"}})
    assert not memory.Setup.from_recipe(four_bit, "bf16").fp8_held

    monkeypatch.setattr(prepare, "check_fp8", lambda *args: None)  # the host check, not the GPU check, is under test
    prepared = api.plan(tiny_recipe(tmp_path, tiny_data, train={"fp8_matmuls": "all", "precision": "bf16"}))
    need = memory.held_weight_bytes(prepared.model_config.get_text_config(),
                                    memory.Setup.from_recipe(prepared.recipe, prepared.precision))
    assert need == 3 * (2 * 128 * 128 + 2 * 128 * 64 + 3 * 128 * 256) * 2
    memory.check_host_memory(prepared, available=0)  # on the CPU the weights stay where they are
    on_gpu = replace(prepared, device=Accelerator(cuda=True, bf16=True, name="gpu"))
    memory.check_host_memory(on_gpu, available=need)  # exactly enough: fine
    with pytest.raises(ToolkitError) as refused:
        memory.check_host_memory(on_gpu, processes=2, available=need)
    assert str(refused.value) == (
        f"training keeps about {2 * need / 2**20:.2f} MiB in host memory (2 training processes): "
        f"{2 * need / 2**20:.2f} MiB of bf16 decoder weights, set aside while train.fp8_matmuls=all trains their "
        f"FP8 copies; this machine has {need / 2**20:.2f} MiB available; set train.fp8_matmuls: forward (its "
        "weights stay on the GPU)")
