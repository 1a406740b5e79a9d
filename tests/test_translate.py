"""Pure translators (recipe -> SFTConfig, LoraConfig, BitsAndBytesConfig) and LoRA placement on real names."""

from __future__ import annotations

import pytest

from toolkit import modeling
from toolkit.errors import ToolkitError
from toolkit.recipe import LoraSection, QuantizationSection, TrainSection
from toolkit.translate import (
    Accelerator,
    resolve_precision,
    sft_kwargs,
    to_bnb_config,
    to_lora_config,
    tower_of,
)

CPU = Accelerator(cuda=False, bf16=False)
H100 = Accelerator(cuda=True, bf16=True, name="NVIDIA H100")
T4 = Accelerator(cuda=True, bf16=False, name="Tesla T4")


def test_auto_precision_follows_the_device():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("auto", H100) == "bf16"
    assert resolve_precision("auto", T4) == "fp16"


def test_precision_the_device_cannot_do_is_refused():
    with pytest.raises(ToolkitError, match="fp16 needs a CUDA GPU"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ToolkitError, match="not supported by Tesla T4"):
        resolve_precision("bf16", T4)


def test_bitsandbytes_configs():
    assert to_bnb_config(QuantizationSection(mode="none"), "bf16") is None
    eight = to_bnb_config(QuantizationSection(mode="8bit", int8_threshold=4.0), "bf16")
    assert eight.load_in_8bit and eight.llm_int8_threshold == 4.0
    four = to_bnb_config(QuantizationSection(mode="4bit"), "bf16")
    assert four.load_in_4bit and four.bnb_4bit_quant_type == "nf4" and four.bnb_4bit_use_double_quant
    assert str(four.bnb_4bit_compute_dtype) == "torch.bfloat16"


def test_sft_config_uses_dynamic_padding_and_the_recipe_values():
    train = TrainSection(batch_size=4, grad_accum=3, learning_rate=1e-3, max_seq_length=300, epochs=2)
    kwargs = sft_kwargs(train, "bf16", H100, "out", has_eval=True, too_long="truncate")
    assert kwargs["per_device_train_batch_size"] == 4 and kwargs["gradient_accumulation_steps"] == 3
    assert kwargs["max_length"] == 300 and kwargs["bf16"] and not kwargs["fp16"]
    assert kwargs["completion_only_loss"] is True
    assert "padding" not in kwargs and kwargs["pad_to_multiple_of"] == 8  # pad per batch, never to max_length
    assert kwargs["eval_strategy"] == "no"  # no eval_steps asked for
    grouped = sft_kwargs(train.model_copy(update={"group_by_length": True}), "fp32", CPU, "o", False, "drop")
    assert grouped["train_sampling_strategy"] == "sequential" and grouped["num_train_epochs"] == 1
    assert grouped["max_length"] is None and grouped["use_cpu"]


@pytest.fixture(scope="module")
def tiny_meta_model():
    return modeling.meta_model(modeling.load_config("builtin:tiny-mllama"))


def placement(model, **lora):
    section = LoraSection(**lora)
    return modeling.check_lora_targets(model, section, to_lora_config(section))


def test_default_scope_is_the_language_model_only(tiny_meta_model):
    matched = placement(tiny_meta_model)
    assert matched and all(tower_of(m) in ("self-attention", "cross-attention") for m in matched)
    assert len(matched) == 16  # q,k,v,o in 4 text layers (3 self-attention, 1 cross-attention)
    assert not any("vision" in m for m in matched)


def test_scope_all_reaches_the_vision_tower(tiny_meta_model):
    matched = placement(tiny_meta_model, scope="all")
    assert any(tower_of(m) == "vision" for m in matched) and len(matched) > 16


def test_a_regex_into_the_vision_tower_is_refused_unless_asked(tiny_meta_model):
    regex = r".*\.(q_proj|v_proj)"
    with pytest.raises(ToolkitError, match="outside lora.scope='language'"):
        placement(tiny_meta_model, targets=regex)
    assert placement(tiny_meta_model, targets=regex, scope="all")


def test_targets_that_match_nothing_are_an_error(tiny_meta_model):
    with pytest.raises(ToolkitError, match="match no linear or embedding module"):
        placement(tiny_meta_model, targets=["qkv_proj"])
