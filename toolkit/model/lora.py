"""Everything about the LoRA adapters: which modules they wrap, where those sit, and how they train in mixed
precision.

Targets are resolved by PEFT itself (its `targeted_module_names` after injecting into the model), on a weightless
meta model in `validate` and on the loaded model in `sft`, so what the toolkit reports is what PEFT wraps.
"""

from __future__ import annotations

import re
from collections import Counter
from contextlib import contextmanager

from toolkit.errors import ToolkitError, first_line

VISION_MARKERS = ("vision_model", "multi_modal_projector")
LAYER_INDEX = re.compile(r"language_model\.(?:model\.)?layers\.(\d+)\.")
PARTS = ("self-attention", "cross-attention", "mlp", "vision", "embedding", "other")
LLAMA_NAMES_HINT = "typical Llama names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"


def target_pattern(lora) -> str | list[str]:
    """LoRA targets as PEFT reads them. A list is confined to the recipe's scope by a regex over module paths;
    a regex string is the user's own and is checked against the real module names instead (`check_scope`)."""
    if isinstance(lora.targets, str):
        return lora.targets
    names = "|".join(sorted(set(lora.targets)))
    towers = "|".join(VISION_MARKERS)
    if lora.scope == "language":
        return rf"^(?!.*(?:{towers})).*\.(?:{names})$"
    if lora.scope == "vision":
        return rf"^.*(?:{towers}).*\.(?:{names})$"
    return sorted(set(lora.targets))


def to_lora_config(lora):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=target_pattern(lora),
        bias=lora.bias,
        task_type="CAUSAL_LM",
    )


def cross_attention_layers(config) -> frozenset[int]:
    """Indices of the language model's cross-attention decoder layers (Mllama; empty for a text-only Llama)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return frozenset(getattr(text, "cross_attention_layers", None) or ())


def part_of(module_name: str, cross_layers: frozenset[int] = frozenset()) -> str:
    """Which part of the model a module belongs to, for placement reports and scope checks.

    A cross-attention decoder layer counts whole as "cross-attention", its MLP included: Mllama skips the entire
    layer for rows without an image, so none of its adapters can learn from text rows.
    """
    if any(marker in module_name for marker in VISION_MARKERS):
        return "vision"
    if "embed_tokens" in module_name:
        return "embedding"
    layer = LAYER_INDEX.search(module_name)
    if "cross_attn" in module_name or (layer and int(layer.group(1)) in cross_layers):
        return "cross-attention"
    if "self_attn" in module_name:
        return "self-attention"
    if ".mlp." in module_name or module_name.endswith(".mlp"):
        return "mlp"
    return "other"


def scope_violations(matched: list[str], scope: str) -> list[str]:
    """Matched modules outside the scope the recipe asked for."""
    if scope == "all":
        return []
    if scope == "language":
        return [m for m in matched if part_of(m) == "vision"]
    return [m for m in matched if part_of(m) != "vision"]


def no_match_error(lora_section) -> ToolkitError:
    return ToolkitError(f"lora.targets {lora_section.targets!r} match no linear or embedding module of this model "
                        f"(lora.scope={lora_section.scope!r}); {LLAMA_NAMES_HINT}")


def check_scope(targeted: list[str], lora_section) -> list[str]:
    """Refuse no match and matches outside the recipe's scope; returns the targeted module names."""
    if not targeted:
        raise no_match_error(lora_section)
    outside = scope_violations(targeted, lora_section.scope)
    if outside:
        raise ToolkitError(
            f"lora.targets reach {len(outside)} module(s) outside lora.scope={lora_section.scope!r} "
            f"(e.g. {outside[0]}); set lora.scope: all if you mean it, or narrow the regex"
        )
    return targeted


def targeted_modules(peft_model) -> list[str]:
    """The module names PEFT wrapped, as its tuner recorded them."""
    return list(peft_model.base_model.targeted_module_names)


def resolve_targets(model, lora_section) -> list[str]:
    """Inject the recipe's adapters into `model` (a weightless meta model is enough) and return what PEFT wrapped."""
    from peft import get_peft_model

    try:
        peft_model = get_peft_model(model, to_lora_config(lora_section))
    except ValueError as err:
        if "not found in the base model" in str(err) or "Target modules" in str(err):
            raise no_match_error(lora_section) from None
        raise ToolkitError(f"lora: PEFT refused the targets: {first_line(err)}") from None
    return check_scope(targeted_modules(peft_model), lora_section)


def trainable_by_part(model) -> Counter:
    """Trainable parameter counts per part (self-attention, cross-attention, MLP, vision, ...)."""
    cross = cross_attention_layers(model.config)
    counts: Counter = Counter()
    for name, param in model.named_parameters():
        if param.requires_grad:
            counts[part_of(name, cross)] += param.numel()
    return counts


def keep_fp32_master_weights(model, precision: str, strategy: str = "ddp") -> None:
    """LoRA weights in fp32 while autocast runs their matmuls in bf16/fp16.

    TRL casts a quantized model's adapters to bf16, which fp16's GradScaler cannot unscale, and bf16 weights lose
    small updates; fp32 master weights avoid both. Under DeepSpeed ZeRO-3 TRL keeps adapters in the base dtype on
    purpose (ZeRO-3 gathers parameters into buffers of one dtype, and mixed bf16/fp32 fails on the first step), and
    DeepSpeed keeps its own fp32 master copy in the optimizer, so the adapters are left as they are there.
    """
    import torch

    if precision not in ("bf16", "fp16") or strategy == "zero3":
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()


@contextmanager
def training_casts(model, precision: str, upcast_inputs: bool, strategy: str = "ddp"):
    """Set the adapters up for mixed-precision training for the duration of the block.

    PEFT upcasts every adapted layer's input to the adapter's dtype: under bf16 that is an fp32 copy of each input,
    kept for backward (the largest avoidable cost of bf16 LoRA). With fp32 master weights and autocast the upcast
    buys nothing, so it is switched off (PEFT's `disable_input_dtype_casting`) unless `lora.upcast_inputs` asks for
    it. Outside the block (inference without autocast) PEFT's casting is back on, as fp32 adapters need it.
    """
    from peft.helpers import disable_input_dtype_casting

    keep_fp32_master_weights(model, precision, strategy)
    mixed = precision in ("bf16", "fp16")
    with disable_input_dtype_casting(model, active=mixed and not upcast_inputs):
        yield
