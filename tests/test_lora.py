"""LoRA placement as PEFT resolves it on real module names, and the mixed-precision rule for training."""

from __future__ import annotations

import pytest
import torch

from toolkit.config.recipe import LoraSection
from toolkit.errors import ToolkitError
from toolkit.model import loading, lora


@pytest.fixture()
def tiny_meta_model():
    return loading.meta_model(loading.load_config("builtin:tiny-mllama"))


def placement(model, **settings):
    return lora.resolve_targets(model, LoraSection(**settings))


def test_default_scope_is_the_language_model_only(tiny_meta_model):
    matched = placement(tiny_meta_model)
    assert len(matched) == 16  # q,k,v,o in 4 text layers (3 self-attention, 1 cross-attention)
    assert sorted({lora.part_of(m) for m in matched}) == ["cross-attention", "self-attention"]


def test_a_cross_attention_layers_mlp_counts_as_cross_attention(tiny_meta_model):
    """Mllama skips a cross-attention decoder layer whole for text rows, its MLP too (layer 2 of 4 here)."""
    cross = lora.cross_attention_layers(tiny_meta_model.config)
    matched = placement(tiny_meta_model, targets=["gate_proj"])
    assert cross == {2} and len(matched) == 4
    assert {m: lora.part_of(m, cross) for m in matched} == {
        f"model.language_model.layers.{i}.mlp.gate_proj": "cross-attention" if i == 2 else "mlp" for i in range(4)}


def test_scope_all_reaches_the_vision_tower(tiny_meta_model):
    matched = placement(tiny_meta_model, scope="all")
    assert len(matched) > 16 and any(lora.part_of(m) == "vision" for m in matched)


def test_a_regex_into_the_vision_tower_is_refused_unless_asked(tiny_meta_model):
    regex = r".*\.(q_proj|v_proj)"
    with pytest.raises(ToolkitError, match="outside lora.scope='language'"):
        placement(tiny_meta_model, targets=regex)
    assert placement(loading.meta_model(loading.load_config("builtin:tiny-mllama")), targets=regex, scope="all")


def test_targets_that_match_nothing_are_an_error(tiny_meta_model):
    with pytest.raises(ToolkitError, match="match no linear or embedding module"):
        placement(tiny_meta_model, targets=["qkv_proj"])


def tiny_bf16_peft_model():
    """A bf16 model whose adapters are bf16 too, as TRL leaves a quantized model's adapters."""
    from peft import get_peft_model

    config = loading.load_config("builtin:tiny-mllama")
    base = loading.model_class(config).from_config(config).to(torch.bfloat16)
    model = get_peft_model(base, lora.to_lora_config(LoraSection()))
    for param in model.parameters():
        param.data = param.data.to(torch.bfloat16)
    return model


def lora_input_dtypes(model, upcast_inputs: bool) -> set:
    """The dtypes reaching LoRA's A matrices in one bf16 autocast forward pass on the CPU."""
    seen = set()
    hooks = [m.register_forward_pre_hook(lambda _, args: seen.add(args[0].dtype))
             for name, m in model.named_modules() if name.endswith("lora_A.default")]
    with lora.training_casts(model, "bf16", upcast_inputs), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    for hook in hooks:
        hook.remove()
    return seen


def test_bf16_training_keeps_fp32_adapters_and_bf16_inputs():
    model = tiny_bf16_peft_model()
    assert lora_input_dtypes(model, upcast_inputs=False) == {torch.bfloat16}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)


def test_upcast_inputs_brings_back_peft_casting():
    assert lora_input_dtypes(tiny_bf16_peft_model(), upcast_inputs=True) == {torch.float32}


def test_zero3_leaves_adapter_dtypes_to_deepspeed():
    model = tiny_bf16_peft_model()
    lora.keep_fp32_master_weights(model, "bf16", strategy="zero3")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
