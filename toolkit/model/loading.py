"""Loading models, tokenizers and processors the way a user's checkpoint is loaded, with one-line errors.

Only loading lives here: what LoRA wraps is `toolkit.model.lora`, how a trainer is built is `toolkit.training.trainer`.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

from toolkit.config.precision import Accelerator, base_dtype
from toolkit.config.quantization import to_bnb_config
from toolkit.errors import ToolkitError, first_line
from toolkit.model import builtin, vision_tower

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
    from huggingface_hub import is_offline_mode

    if is_offline_mode():
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
    if local.exists() and not local.is_dir():
        raise ToolkitError(f"model.name {name} is a file, not a model folder; give the folder that holds its "
                           "config.json (or a hub id)")
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
        raise ToolkitError(unreachable_message(name, first_line(err))) from None


def is_vision_config(config) -> bool:
    return getattr(config, "vision_config", None) is not None


def load_tokenizer(name: str, revision: str | None = None):
    """The tokenizer, with the chat template taken from the processor when only the processor carries it."""
    from transformers import AutoTokenizer

    location = model_location(name)
    tokenizer = AutoTokenizer.from_pretrained(location, revision=revision)
    if tokenizer.chat_template is None:
        from transformers import (
            AutoProcessor,  # imports the model code (and torch): only when it is needed
        )

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


def attention_kernel(recipe, device: Accelerator | None, training: bool, precision: str | None = None) -> str:
    """The attention implementation to load. `auto` picks a kernel that skips the pairs of different rows only to
    train padding-free batches on a GPU: PyTorch's variable-length FlashAttention (`toolkit.model.varlen`), or
    FlexAttention where PyTorch has no varlen. On an H100 FlexAttention's steps ran 1.12-1.25x faster than padded
    ones, while SDPA, given the packed rows' mask, ran them 2.2x slower (docs/benchmarks.md). Everywhere else, SDPA;
    varlen reads no mask, so what pads its batches (eval, generate, merge) loads SDPA even where the recipe names
    varlen. FlashAttention computes in bf16 or fp16 only, so an fp32 run (`precision`) gets FlexAttention."""
    chosen = recipe.model.attn_implementation
    packed_on_gpu = training and recipe.train.padding_free and device is not None and device.cuda
    if chosen == "auto":
        if not packed_on_gpu:
            return "sdpa"
        from toolkit.model import varlen

        return varlen.NAME if varlen.available() and precision != "fp32" else "flex_attention"
    if chosen == "varlen" and not (training and recipe.train.padding_free):
        return "sdpa"
    return chosen


def load_model(recipe, precision: str, device: Accelerator, quantize: bool = True, training: bool = False):
    """Load the base model as the recipe says (dtype, attention, quantization) on the training device; `training`:
    for the Trainer (`attention_kernel`)."""
    import torch

    config = load_config(recipe.model.name, recipe.model.revision)
    attention = attention_kernel(recipe, device, training, precision)
    kwargs = {
        "dtype": getattr(torch, base_dtype(recipe.model.dtype, precision)),
        "attn_implementation": attention,
    }
    if recipe.model.revision:
        kwargs["revision"] = recipe.model.revision
    bnb = to_bnb_config(recipe.quantization, precision) if quantize else None
    if bnb is not None:
        kwargs["quantization_config"] = bnb
        kwargs["device_map"] = {"": torch.cuda.current_device() if device.cuda else "cpu"}
    if attention == "varlen":
        from toolkit.model import varlen

        varlen.register()
    if attention == "flash_attention_2" and not device.cuda:
        raise ToolkitError("model.attn_implementation=flash_attention_2 needs a CUDA GPU; use sdpa on CPU")
    try:
        model = model_class(config).from_pretrained(model_location(recipe.model.name), **kwargs)
    except ImportError as err:
        raise ToolkitError(f"cannot load '{recipe.model.name}': {first_line(err)}") from None
    vision_tower.prepare(model, recipe.data.vision_tiles, "sdpa" if attention == "varlen" else attention)
    if recipe.quantization.mode == "8bit" and quantize:
        feed_int8_layers_rows(model)
    return model


def feed_int8_layers_rows(model) -> int:
    """Give every 8-bit layer its input as rows (2-D) and its output back in the input's shape; returns how many.

    bitsandbytes' LLM.int8() matmul flattens a 3-D input to rows but passes a longer one on as it is, and then finds
    the outlier columns with `argwhere(outliers.any(dim=0)).view(-1)`, which assumes rows. Mllama's projector gets
    the vision features as (batch, images, tiles, tokens, features): on CUDA the first feature at or above
    `int8_threshold` makes that `view` raise ("view size is not compatible with input tensor's size and stride"), so
    eval and generate on image rows crashed with an 8-bit base (training runs these layers through the dequantizing
    path of `toolkit.model.fastlora` and never reached it). Rows are what the matmul computes anyway, so the
    result is the same."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear8bitLt)]
    for layer in layers:
        layer.register_forward_pre_hook(_as_rows)
        layer.register_forward_hook(_in_input_shape)
    return len(layers)


def _as_rows(layer, args):
    x = args[0]
    layer._toolkit_input_shape = x.shape[:-1] if x.dim() > 3 else None
    return (x.reshape(-1, x.shape[-1]), *args[1:]) if x.dim() > 3 else None


def _in_input_shape(layer, args, output):
    shape, layer._toolkit_input_shape = layer._toolkit_input_shape, None
    return output if shape is None else output.reshape(*shape, output.shape[-1])






def meta_model(config):
    """The architecture with no weights, for checking module names (LoRA targets) without loading anything."""
    import torch

    with torch.device("meta"):
        return model_class(config).from_config(config)
