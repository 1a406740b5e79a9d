"""Quantization policy, in one place: the `quantization` recipe section as transformers' BitsAndBytesConfig, and
which linear layers the loader leaves unquantized. A new quantization mode starts here (and in
`toolkit.config.recipe.QuantizationSection`, and `toolkit.training.memory` for its bytes per weight).
"""

from __future__ import annotations

from toolkit.config.precision import DTYPE_NAMES
from toolkit.errors import ToolkitError


def to_bnb_config(quantization, precision: str):
    """BitsAndBytesConfig for 8-bit/4-bit, None for no quantization."""
    if quantization.mode == "none":
        return None
    from transformers import BitsAndBytesConfig

    skip = list(quantization.skip_modules) if quantization.skip_modules else None
    if quantization.mode == "8bit":
        return BitsAndBytesConfig(
            load_in_8bit=True, llm_int8_threshold=quantization.int8_threshold, llm_int8_skip_modules=skip
        )
    compute = precision if quantization.compute_dtype == "auto" else quantization.compute_dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization.quant_type,
        bnb_4bit_use_double_quant=quantization.double_quant,
        bnb_4bit_compute_dtype=DTYPE_NAMES[compute],
        bnb_4bit_quant_storage=DTYPE_NAMES[compute],
        llm_int8_skip_modules=skip,
    )


def quantized(name: str, skip_modules) -> bool:
    """Whether the loader quantizes the linear layer `name`: unless `skip_modules` (a list replaces transformers'
    default of keeping `lm_head`) matches it from its start, as a regex, or as its end."""
    skip = list(skip_modules) if skip_modules else ["lm_head"]
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # a transformers without this rule: match by the end of the name
        return not name.endswith(tuple(skip))
    return should_convert_module(name, skip)


def check_skip_modules(quantization, model) -> None:
    """Refuse `quantization.skip_modules` entries that keep nothing unquantized, by the rule the loader applies
    (transformers' `should_convert_module`: a name matches a module path from its start, as a regex, or as its
    end), so `vision_model` is not silently ignored where `model.vision_model` was meant."""
    if quantization.mode == "none" or not quantization.skip_modules:
        return
    try:
        from transformers.quantizers.quantizers_utils import should_convert_module
    except ImportError:  # a transformers without this rule: nothing to check against
        return
    import torch

    linear = [name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)]
    unmatched = [entry for entry in quantization.skip_modules
                 if all(should_convert_module(name, [entry]) for name in linear)]
    if unmatched:
        example = "model.vision_model" if any(name.startswith("model.vision_model.") for name in linear) else "model"
        raise ToolkitError(f"quantization.skip_modules: {', '.join(map(repr, unmatched))} match no linear layer of "
                           f"this model; an entry matches a module path from its start (e.g. {example}) or its end "
                           "(e.g. lm_head)")
