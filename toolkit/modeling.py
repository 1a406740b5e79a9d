"""Loading models, tokenizers and processors the way a user's checkpoint is loaded, with one-line errors."""

from __future__ import annotations

import logging
import os
import socket
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

from toolkit import builtin
from toolkit.errors import ToolkitError
from toolkit.translate import Accelerator, base_dtype, scope_violations, to_bnb_config, tower_of

QUICKSTART_HINT = "to try the toolkit offline, run: toolkit sft recipes/quickstart.yaml"


def detect_accelerator() -> Accelerator:
    import torch

    if not torch.cuda.is_available():
        return Accelerator(cuda=False, bf16=False)
    return Accelerator(cuda=True, bf16=torch.cuda.is_bf16_supported(), name=torch.cuda.get_device_name(0))


def model_location(name: str) -> str:
    """Where `from_pretrained` should read: the built-in model's cache directory, or the name as given."""
    return str(builtin.ensure_builtin(name)) if builtin.is_builtin(name) else name


def hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt, so an offline machine gets an answer in seconds instead of retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def unreachable_message(name: str, detail: str = "") -> str:
    why = f" ({detail})" if detail else ""
    return (
        f"cannot load model '{name}': it is not a local directory, not in the Hugging Face cache, and the hub is "
        f"unreachable or refused it{why}. On a connected machine run `hf download {name}` (gated models need "
        f"`hf auth login` and accepted terms) and set model.name to that folder; {QUICKSTART_HINT}"
    )


def load_config(name: str, revision: str | None = None):
    """The model's config, from a local folder, the cache, or the hub; a clear one-line error otherwise."""
    from transformers import AutoConfig

    location = model_location(name)
    local = Path(location).expanduser()
    if local.is_dir():
        if not (local / "config.json").exists():
            raise ToolkitError(f"model folder {local} has no config.json; is it a Hugging Face checkpoint?")
        return AutoConfig.from_pretrained(local)
    if name.startswith((".", "/", "~")):
        raise ToolkitError(f"model folder not found: {name}")
    try:
        return AutoConfig.from_pretrained(location, revision=revision, local_files_only=True)
    except (OSError, ValueError):
        pass
    if not hub_reachable():
        raise ToolkitError(unreachable_message(name))
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    try:
        return AutoConfig.from_pretrained(location, revision=revision)
    except (OSError, ValueError) as err:
        raise ToolkitError(unreachable_message(name, str(err).splitlines()[0])) from None


def is_vision_config(config) -> bool:
    return getattr(config, "vision_config", None) is not None


def load_tokenizer(name: str, revision: str | None = None):
    """The tokenizer, with the chat template taken from the processor when only the processor carries it."""
    from transformers import AutoProcessor, AutoTokenizer

    location = model_location(name)
    tokenizer = AutoTokenizer.from_pretrained(location, revision=revision)
    if tokenizer.chat_template is None:
        try:
            processor = AutoProcessor.from_pretrained(location, revision=revision)
            tokenizer.chat_template = getattr(processor, "chat_template", None)
        except (OSError, ValueError):
            pass
    if tokenizer.chat_template is None:
        raise ToolkitError(f"model '{name}' has no chat template; the toolkit trains Llama 3 chat models")
    if tokenizer.pad_token is None:
        pad = "<|finetune_right_pad_id|>"
        tokenizer.pad_token = pad if pad in tokenizer.get_vocab() else tokenizer.eos_token
    return tokenizer


def load_processor(name: str, revision: str | None = None):
    """The multimodal processor for vision models (None for text-only models)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model_location(name), revision=revision)
    except (OSError, ValueError, TypeError):
        return None


def model_class(config):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    return AutoModelForImageTextToText if is_vision_config(config) else AutoModelForCausalLM


def load_model(recipe, precision: str, device: Accelerator, quantize: bool = True):
    """Load the base model as the recipe says (dtype, attention, quantization) on the training device."""
    import torch

    config = load_config(recipe.model.name, recipe.model.revision)
    kwargs = {
        "dtype": getattr(torch, base_dtype(recipe.model.dtype, precision)),
        "attn_implementation": recipe.model.attn_implementation,
    }
    if recipe.model.revision:
        kwargs["revision"] = recipe.model.revision
    bnb = to_bnb_config(recipe.quantization, precision) if quantize else None
    if bnb is not None:
        kwargs["quantization_config"] = bnb
        kwargs["device_map"] = {"": torch.cuda.current_device() if device.cuda else "cpu"}
    if recipe.model.attn_implementation == "flash_attention_2" and not device.cuda:
        raise ToolkitError("model.attn_implementation=flash_attention_2 needs a CUDA GPU; use sdpa on CPU")
    try:
        return model_class(config).from_pretrained(model_location(recipe.model.name), **kwargs)
    except ImportError as err:
        raise ToolkitError(f"cannot load '{recipe.model.name}': {str(err).splitlines()[0]}") from None


def meta_model(config):
    """The architecture with no weights, for checking module names (LoRA targets) without loading anything."""
    import torch

    with torch.device("meta"):
        return model_class(config).from_config(config)


def match_targets(model, lora_config) -> list[str]:
    """Module names PEFT would wrap (linear and embedding layers), using PEFT's own matching rule."""
    import torch
    from peft.tuners.tuners_utils import check_target_module_exists

    names = []
    for name, module in model.named_modules():
        adaptable = isinstance(module, (torch.nn.Linear, torch.nn.Embedding))
        if adaptable or type(module).__name__ in ("Linear8bitLt", "Linear4bit"):
            if check_target_module_exists(lora_config, name):
                names.append(name)
    return names


def check_lora_targets(model, lora_section, lora_config) -> list[str]:
    """Resolve targets on the real module names; refuse no match and matches outside the recipe's scope."""
    matched = match_targets(model, lora_config)
    if not matched:
        raise ToolkitError(
            f"lora.targets {lora_section.targets!r} match no linear or embedding module of this model; "
            "typical Llama names: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj"
        )
    outside = scope_violations(matched, lora_section.scope)
    if outside:
        raise ToolkitError(
            f"lora.targets reach {len(outside)} module(s) outside lora.scope={lora_section.scope!r} "
            f"(e.g. {outside[0]}); set lora.scope: all if you mean it, or narrow the regex"
        )
    return matched


def trainable_by_tower(model) -> Counter:
    """Trainable parameter counts per tower (language self-attention, cross-attention, MLP, vision)."""
    counts: Counter = Counter()
    for name, param in model.named_parameters():
        if param.requires_grad:
            counts[tower_of(name)] += param.numel()
    return counts


def adapters_for_mixed_precision(model, precision: str, upcast_inputs: bool = False) -> None:
    """Keep LoRA weights in fp32 and let autocast run their matmuls in bf16/fp16.

    PEFT upcasts every adapted layer's input to the adapter's dtype: under bf16 that is an fp32 copy of each
    input, kept for backward (the largest avoidable cost of bf16 LoRA). TRL instead casts quantized models'
    adapters to bf16, which fp16's GradScaler cannot unscale. fp32 master weights + no input upcast avoids both.
    Only for training: outside autocast, fp32 adapters need the upcast again (a fresh load has it).
    """
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    if precision not in ("bf16", "fp16"):
        return
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = upcast_inputs


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends an answer: the generation config's eos ids (end_of_text, eom, eot) and the tokenizer's."""
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = list(configured) if isinstance(configured, (list, tuple)) else [configured]
    ids += [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    return list(dict.fromkeys(i for i in ids if isinstance(i, int) and i != tokenizer.unk_token_id))
