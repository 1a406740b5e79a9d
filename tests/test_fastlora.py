"""The fused LoRA and dequantized 8-bit layers (toolkit.model.fastlora) compute what PEFT and bitsandbytes compute, with
the same gradients, and keep less for backward."""

from __future__ import annotations

import pytest
import torch

from toolkit.config.recipe import LoraSection
from toolkit.model import fastlora, loading, lora
from toolkit.training import memory


def tiny_peft_model(dropout: float = 0.0):
    """The built-in model with LoRA on q,k,v,o of the language model, B matrices made non-zero so that every
    adapter contributes to the output and to every gradient."""
    from peft import get_peft_model

    config = loading.load_config("builtin:tiny-mllama")
    torch.manual_seed(0)
    base = loading.model_class(config).from_config(config)
    model = get_peft_model(base, lora.to_lora_config(LoraSection(dropout=dropout)))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    return model.train()


def loss_and_grads(model, fused: bool):
    ids = torch.arange(24).reshape(2, 12) * 7 % 900
    model.zero_grad()
    torch.manual_seed(1)
    with fastlora.fused_layers(model, lora=fused, int8_dequantize=False) as counts:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, counts


def assert_same(plain, fused, tolerance=1e-5):
    assert fused[0] == pytest.approx(plain[0], rel=tolerance)
    assert plain[1].keys() == fused[1].keys() and plain[1]
    for name, grad in plain[1].items():
        assert torch.allclose(fused[1][name], grad, rtol=tolerance, atol=tolerance * grad.abs().max()), name


def test_fused_lora_matches_peft_outputs_and_gradients():
    model = tiny_peft_model()
    plain, fused = loss_and_grads(model, fused=False), loss_and_grads(model, fused=True)
    assert fused[2]["lora"] == 16 and plain[2]["lora"] == 0
    assert_same(plain, fused)


class OneLayer(torch.nn.Module):
    def __init__(self, layer):
        super().__init__()
        self.proj = layer

    def forward(self, x):
        return self.proj(x)


def quantized_layer(bits: int):
    """A 24 -> 16 bitsandbytes layer with random weights, quantized on the CPU."""
    import bitsandbytes as bnb

    torch.manual_seed(0)
    if bits == 8:
        layer = bnb.nn.Linear8bitLt(24, 16, bias=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(24, 16, bias=False, compute_dtype=torch.float32)
    layer.load_state_dict({"weight": torch.randn(16, 24)})
    return layer.to("cpu")


@pytest.mark.parametrize("bits", [8, 4])
def test_fused_lora_matches_peft_on_quantized_weights(bits):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(OneLayer(quantized_layer(bits)), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"]))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.05)
    model.train()
    x = torch.randn(2, 5, 24)
    results = []
    for fused in (False, True):
        model.zero_grad()
        inputs = x.clone().requires_grad_(True)
        with fastlora.fused_layers(model, lora=fused, int8_dequantize=fused) as counts:
            out = model(inputs)
            out.pow(2).sum().backward()
        results.append((out, inputs.grad, {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                        counts))
    (out, grad_x, grads, _), (fused_out, fused_grad_x, fused_grads, counts) = results
    assert counts["lora"] == 1
    assert torch.allclose(fused_out, out, atol=1e-4) and torch.allclose(fused_grad_x, grad_x, atol=1e-4)
    assert grads.keys() == fused_grads.keys() and len(grads) == 2
    assert all(torch.allclose(fused_grads[n], g, rtol=1e-4, atol=1e-4) for n, g in grads.items())


def test_dropout_mask_of_backward_is_the_mask_of_forward():
    """Gradients checked against finite differences: each call redraws the same mask from a reset generator, so a
    backward that rebuilt a different mask than its forward used would fail."""
    layer = torch.nn.Linear(6, 5).double().requires_grad_(False)
    x = torch.randn(4, 6, dtype=torch.double, requires_grad=True)
    a = torch.randn(3, 6, dtype=torch.double, requires_grad=True)
    b = torch.randn(5, 3, dtype=torch.double, requires_grad=True)

    def fused(x, a, b):
        torch.manual_seed(0)
        return fastlora.LoraLinearFunction.apply(x, a, b, layer, "dense", 0.7, 0.5, "none")

    assert torch.autograd.gradcheck(fused, (x, a, b))
    torch.manual_seed(0)
    out = fused(x, a, b)
    assert not torch.allclose(out, layer(x) + 0.7 * x @ a.t() @ b.t())  # dropout did drop something


def test_fused_lora_keeps_no_dropout_copies():
    """PEFT keeps a dropped-out copy of each adapted layer's input (and its mask); the fused layer keeps only the
    input, so with dropout it keeps what PEFT keeps without."""
    ids = torch.arange(64).reshape(2, 32) % 900

    def kept(dropout, fused):
        model = tiny_peft_model(dropout)
        params = list(model.parameters())
        with fastlora.fused_layers(model, lora=fused, int8_dequantize=False):
            return memory.saved_tensor_bytes(lambda: model(input_ids=ids), exclude=params)

    without_dropout = kept(0.0, fused=False)
    assert kept(0.1, fused=False) > without_dropout
    assert kept(0.1, fused=True) <= without_dropout


def test_dequantized_8bit_layer_keeps_no_input():
    import bitsandbytes as bnb

    layer = bnb.nn.Linear8bitLt(16, 8, bias=False, has_fp16_weights=False)
    layer.load_state_dict({"weight": torch.randn(8, 16)})
    layer = layer.to("cpu")  # quantizes
    rows, absmax = fastlora.int8_parts(layer)
    dense = fastlora.dequantize_int8(rows, absmax, torch.float32)
    assert torch.allclose(dense, bnb.functional.int8_vectorwise_dequant(rows, absmax), atol=1e-6)
    x = torch.randn(3, 16, requires_grad=True)
    with fastlora.fused_layers(torch.nn.Sequential(layer), lora=False, int8_dequantize=True) as counts:
        saved = memory.saved_tensor_bytes(lambda: layer(x).sum().backward(), exclude=[layer.weight])
    assert counts["int8"] == 1 and saved == 0
    assert torch.allclose(x.grad, torch.ones(3, 8) @ dense)


def test_layers_get_their_own_forward_back_and_fallbacks_go_through_peft():
    model = tiny_peft_model()
    module = next(m for _, m, _ in fastlora.lora_linear_modules(model))
    with fastlora.fused_layers(model, lora=True, int8_dequantize=False):
        assert "forward" in vars(module)
        with torch.no_grad():  # no gradients: PEFT's forward
            model(input_ids=torch.tensor([[1, 2, 3]]))
        with model.disable_adapter():
            assert fastlora.single_adapter(module) is None
    assert "forward" not in vars(module)


def identity_lora(dropout: float, width: int = 400):
    """One dense layer with a LoRA adapter whose A and B are identities (r = width, scale 1): the adapter's share of
    the output is exactly dropout(x)."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(OneLayer(torch.nn.Linear(width, width)),
                           LoraConfig(r=width, lora_alpha=width, lora_dropout=dropout, target_modules=["proj"]))
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data.copy_(torch.eye(width))
    return model


def adapter_share(model, x):
    """The adapter's share of the fused forward's output (gradients on, so the fused function runs)."""
    layer = next(m for _, m, _ in fastlora.lora_linear_modules(model))
    with fastlora.fused_layers(model, lora=True, int8_dequantize=False) as counts:
        out = model(x)
    assert counts["lora"] == 1
    return (out - layer.get_base_layer()(x)).detach()


def test_fused_dropout_drops_its_probability_and_scales_the_rest():
    """p = 0.05 zeroes about 5% of the adapter's inputs (not 95%) and scales the kept ones by 1 / 0.95; in eval mode
    nothing is dropped. A test at p = 0.5 could not tell p from 1 - p."""
    model = identity_lora(0.05).train()
    x = torch.ones(50, 400, requires_grad=True)
    torch.manual_seed(0)
    share = adapter_share(model, x)
    dropped = (share.abs() < 1e-6).float().mean().item()
    assert 0.04 < dropped < 0.06
    kept = share[share.abs() >= 1e-6]
    assert torch.allclose(kept, torch.full_like(kept, 1 / 0.95), atol=1e-5)
    assert torch.allclose(adapter_share(model.eval(), x), torch.ones(50, 400), atol=1e-5)


def test_rebuilding_a_mask_leaves_the_generator_where_it_was():
    """Backward redraws forward's mask from a saved state; the generator is then put back, so what is drawn after
    backward (the next dropout, the next shuffle) does not depend on whether a mask was rebuilt."""
    layer = torch.nn.Linear(6, 5).requires_grad_(False)
    x = torch.randn(4, 6, requires_grad=True)
    a = torch.randn(3, 6, requires_grad=True)
    b = torch.randn(5, 3, requires_grad=True)
    torch.manual_seed(0)
    out = fastlora.LoraLinearFunction.apply(x, a, b, layer, "dense", 0.7, 0.5, "none")
    torch.rand(7)  # something else draws between forward and backward
    before = torch.get_rng_state()
    out.sum().backward()
    assert torch.equal(torch.get_rng_state(), before)


def test_dequantized_8bit_layers_keep_their_bias():
    """Vision-tower layers have biases: the fused 8-bit paths (frozen, and under LoRA) add the bias as
    bitsandbytes' own layer does."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    layer = bnb.nn.Linear8bitLt(24, 16, bias=True, has_fp16_weights=False)
    layer.load_state_dict({"weight": torch.randn(16, 24), "bias": torch.randn(16) * 3})
    layer = layer.to("cpu")
    x = torch.randn(3, 24, requires_grad=True)
    with torch.no_grad():
        expected = layer(x)  # bitsandbytes' own forward
    with fastlora.fused_layers(torch.nn.Sequential(layer), lora=False, int8_dequantize=True) as counts:
        frozen = layer(x)
    assert counts["int8"] == 1
    assert torch.allclose(frozen, expected, atol=2e-2) and not torch.allclose(frozen - layer.bias, expected, atol=1)
    model = get_peft_model(OneLayer(layer), LoraConfig(r=4, lora_alpha=8, target_modules=["proj"])).train()
    with fastlora.fused_layers(model, lora=True, int8_dequantize=True) as counts:
        adapted = model(x)  # lora_B starts at zero: the output is the base layer's
    assert counts["lora"] == 1
    assert torch.allclose(adapted, expected, atol=2e-2)


def checkpointed_step(frozen_dense: bool):
    """One checkpointed forward and backward of the built-in model with LoRA on q,k,v,o: the loss, the gradients, and
    how often each text layer's MLP projections started in backward (the recomputation)."""
    model = tiny_peft_model(dropout=0.1)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    started = {"gate_proj": 0, "down_proj": 0}
    backward = [False]
    for name, module in model.named_modules():
        kind = name.rsplit(".", 1)[-1]
        if kind in started and "vision" not in name:
            module.register_forward_pre_hook(lambda m, i, kind=kind: started.__setitem__(kind, started[kind] +
                                                                                           backward[0]))
    ids = torch.arange(24).reshape(2, 12) * 7 % 900
    torch.manual_seed(1)
    with fastlora.fused_layers(model, lora=True, int8_dequantize=False, frozen_dense=frozen_dense) as counts:
        loss = model(input_ids=ids, labels=ids).loss
        backward[0] = True
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads, counts, started


def test_frozen_dense_layers_spare_the_recomputation_the_mlps_last_projection():
    """Under checkpointing, backward remakes a layer's forward until everything it kept is back. `F.linear` keeps a
    view of its frozen weight, so the MLP's down projection, whose output nothing in backward needs, was run again
    for that view alone; the frozen-layer function keeps nothing, so the recomputation stops before it. Gate and
    up projections still run (SwiGLU needs their outputs), and loss and gradients are those of PyTorch's layers."""
    plain, frozen = checkpointed_step(False), checkpointed_step(True)
    assert plain[3] == {"gate_proj": 3, "down_proj": 3}
    assert frozen[3] == {"gate_proj": 3, "down_proj": 0}
    assert frozen[2]["dense"] > 0 and plain[2]["dense"] == 0
    assert_same(plain[:3], frozen[:3], tolerance=1e-6)


def test_frozen_dense_layers_run_only_with_checkpointing_and_whole_weights():
    from toolkit.config.recipe import Recipe

    recipe = Recipe.model_validate({"model": {"name": "builtin:tiny-mllama"},
                                    "data": {"train": "t.jsonl", "formatter": "alpaca"},
                                    "train": {"gradient_checkpointing": True}})
    assert fastlora.paths_on(recipe)["frozen_dense"] is True
    assert fastlora.paths_on(recipe, "fsdp")["frozen_dense"] is False
    off = recipe.model_copy(update={"train": recipe.train.model_copy(update={"gradient_checkpointing": False})})
    assert fastlora.paths_on(off)["frozen_dense"] is False
