"""GPU memory of a training step, and `train.batch_size: auto`: the largest micro-batch that fits a budget.

Peak memory = frozen weights + what autograd keeps per token x the tokens of the longest micro-batch + a reserve
(adapters and their optimizer state, the LM head's tiles, the allocator). Weights are counted on the weightless
architecture, by parameter and quantization. What a decoder layer keeps per token is counted from the tensors its
backward needs (listed in `layer_bytes_per_token`); `saved_tensor_bytes` measures the same thing on a real forward
pass, which is how the tests hold the count to the code. docs/benchmarks.md compares the estimate with measured
peaks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

from toolkit.config.precision import pad_multiple
from toolkit.errors import ToolkitError

GIB = 2**30
RESERVE_BYTES = 2 * GIB  # adapters + AdamW state, LM-head tiles, dequantized weights in flight, allocator
MAX_AUTO_BATCH = 64  # past this, a step's fixed cost is already small, and fewer optimizer steps change learning


@dataclass(frozen=True)
class Setup:
    """The recipe settings that change what a step keeps in memory."""

    quantization: str = "none"  # none, 8bit, 4bit
    double_quant: bool = True
    int8_matmul: str = "dequantize"
    fused_lora: bool = True
    liger: bool = False
    checkpointing: bool = False
    offload: bool = False  # checkpointed layers' inputs live in host memory (toolkit.training.activations)
    checkpoint_layers: int | None = None  # self-attention layers checkpointed; None: all
    dropout: float = 0.0
    upcast_inputs: bool = False
    adapted_per_layer: int = 4  # LoRA modules in one decoder layer
    compute_bytes: int = 2  # bf16/fp16; 4 for fp32
    skip_modules: tuple[str, ...] | None = None  # quantization.skip_modules: linear layers left unquantized
    fp8_held: bool = False  # decoder weights trained through e4m3 copies, the 16-bit ones in host memory meanwhile

    @classmethod
    def from_recipe(cls, recipe, precision: str, strategy: str = "ddp") -> "Setup":
        from toolkit.model import fastlora

        fused = fastlora.paths_on(recipe, strategy)
        targets = recipe.lora.targets
        per_layer = len(set(targets)) if isinstance(targets, list) else 7
        return cls(quantization=recipe.quantization.mode, double_quant=recipe.quantization.double_quant,
                   int8_matmul="dequantize" if fused["int8_dequantize"] else "int8",
                   fused_lora=fused["lora"],
                   liger=recipe.train.liger_kernel, checkpointing=bool(recipe.train.gradient_checkpointing),
                   offload=recipe.train.gradient_checkpointing == "offload",
                   checkpoint_layers=layers if isinstance(layers := recipe.train.checkpoint_layers, int) else None,
                   dropout=recipe.lora.dropout, upcast_inputs=recipe.lora.upcast_inputs,
                   adapted_per_layer=per_layer,
                   compute_bytes=4 if precision == "fp32" else 2,
                   skip_modules=tuple(skip) if (skip := recipe.quantization.skip_modules) else None,
                   fp8_held=fused["fp8"] == "all" and recipe.quantization.mode == "none" and precision != "fp32")


# ---- weights ----


def quantized_bytes_per_weight(setup: Setup, in_features: int) -> float:
    """bitsandbytes storage: int8 plus one fp32 absmax per row; NF4/FP4 plus one absmax per 64 weights (an 8-bit
    code of it with double quantization, fp32 without)."""
    if setup.quantization == "8bit":
        return 1.0 + 4.0 / in_features
    return 0.5 + (1.0 if setup.double_quant else 4.0) / 64


def weight_bytes(meta_model, setup: Setup) -> int:
    """Bytes of the frozen model: linear layers as quantized (all but those `quantization.skip_modules` keeps, by
    the loader's own rule), everything else in the compute dtype."""
    import torch

    from toolkit.config.quantization import quantized

    total = 0.0
    counted = set()
    for name, module in meta_model.named_modules():
        if (isinstance(module, torch.nn.Linear) and setup.quantization != "none"
                and quantized(name, setup.skip_modules)):
            total += module.weight.numel() * quantized_bytes_per_weight(setup, module.in_features)
            counted.add(id(module.weight))
    for param in meta_model.parameters():
        if id(param) not in counted:
            total += param.numel() * setup.compute_bytes
    return int(total)


# ---- activations ----


def layer_bytes_per_token(text_config, setup: Setup) -> int:
    """What one self-attention decoder layer keeps for backward, per token, in bytes.

    Always: the two RMSNorm inputs, the normed input the q/k/v adapters need for their gradient, q, k and v for
    attention, the attention output (counted twice: attention keeps it and the o_proj adapter keeps its reshaped
    copy), and the MLP's gate and up projections for SwiGLU's backward. Without Liger, transformers' RMSNorm keeps
    fp32 copies of its input and SwiGLU keeps silu(gate) as well. PEFT's own layers add, per adapted module with
    dropout, a dropped-out copy of its input and the mask, and with `lora.upcast_inputs` an fp32 copy of it.
    """
    h = text_config.hidden_size
    heads = text_config.num_attention_heads
    kv = getattr(text_config, "num_key_value_heads", heads) * (getattr(text_config, "head_dim", None) or h // heads)
    inter = text_config.intermediate_size
    b = setup.compute_bytes
    kept = b * (2 * h + h + (h + 2 * kv) + 2 * h) + b * 2 * inter
    if not setup.liger:
        kept += 2 * 4 * h + b * inter
    if not setup.fused_lora and setup.dropout > 0:
        kept += setup.adapted_per_layer * (b + 1) * h
    if not setup.fused_lora and setup.upcast_inputs and b < 4:
        kept += setup.adapted_per_layer * 4 * h
    return kept


def int8_inputs_per_token(text_config, setup: Setup) -> int:
    """What bitsandbytes' LLM.int8() matmul keeps per token and layer: the input of every 8-bit layer (q/k/v share
    one, gate/up share one, plus o_proj's and down_proj's). It keeps them on its autograd context, out of reach of
    gradient checkpointing's hooks, so checkpointing does not free them (docs/benchmarks.md)."""
    if setup.quantization != "8bit" or setup.int8_matmul != "int8":
        return 0
    return setup.compute_bytes * (3 * text_config.hidden_size + text_config.intermediate_size)


def text_layers(text_config) -> int:
    """Decoder layers a text token passes through (cross-attention layers are skipped without an image)."""
    return text_config.num_hidden_layers - len(getattr(text_config, "cross_attention_layers", None) or [])


OFFLOAD_IN_FLIGHT = 2  # offloaded layer inputs on the GPU at once: one in use, the next fetched ahead


def checkpointed_layers(text_config, setup: Setup) -> int:
    layers = text_layers(text_config)
    if not setup.checkpointing:
        return 0
    return layers if setup.checkpoint_layers is None else min(setup.checkpoint_layers, layers)


def activation_bytes_per_token(text_config, setup: Setup) -> int:
    """GPU bytes kept per token of the longest micro-batch. A checkpointed layer keeps only its input (in host
    memory when offloaded, but for the few copies in flight), and one layer at a time is recomputed in full; the
    other layers keep everything `layer_bytes_per_token` counts. The LM head keeps the last hidden state and, in
    backward, an fp32 gradient of it."""
    layer = layer_bytes_per_token(text_config, setup)
    layers = text_layers(text_config)
    checkpointed = checkpointed_layers(text_config, setup)
    h = text_config.hidden_size
    head = (setup.compute_bytes + 4) * h
    int8 = layers * int8_inputs_per_token(text_config, setup)
    inputs = min(checkpointed, OFFLOAD_IN_FLIGHT) if setup.offload else checkpointed
    recompute = layer if checkpointed else 0
    return (layers - checkpointed) * layer + inputs * setup.compute_bytes * h + recompute + head + int8


def pinned_block_bytes(nbytes: int) -> int:
    """The pinned host block PyTorch's host allocator reserves for `nbytes`: the next power of two."""
    return 1 << max(nbytes - 1, 0).bit_length()


def host_bytes(text_config, setup: Setup, rows: int, tokens: int) -> int:
    """Pinned host memory for a micro-batch of `rows` rows of `tokens` tokens (the longest): each checkpointed
    layer's offloaded input in its own power-of-two block (`toolkit.training.activations.PinnedBuffers`)."""
    if not setup.offload:
        return 0
    one_input = rows * tokens * setup.compute_bytes * text_config.hidden_size
    return checkpointed_layers(text_config, setup) * pinned_block_bytes(one_input)


def held_weight_bytes(text_config, setup: Setup) -> int:
    """Host memory for the 16-bit decoder weights `fastlora.fused_layers` moves there while their e4m3 copies
    train (`train.fp8_matmuls: all` over unquantized weights): the seven projections of every self-attention layer
    whose shape the FP8 product takes. The e4m3 pair takes their place on the GPU at the same size (one byte each),
    so the GPU count does not change."""
    if not setup.fp8_held:
        return 0
    from toolkit.model import fp8

    h, heads = text_config.hidden_size, text_config.num_attention_heads
    head_dim = getattr(text_config, "head_dim", None) or h // heads
    q, kv = heads * head_dim, getattr(text_config, "num_key_value_heads", heads) * head_dim
    inter = text_config.intermediate_size
    shapes = [(h, q), (h, kv), (h, kv), (q, h), (h, inter), (h, inter), (inter, h)]  # (in, out) of q k v o gate up down
    per_layer = sum(i * o for i, o in shapes if fp8.fits(i, o))
    return text_layers(text_config) * per_layer * setup.compute_bytes


# ---- images ----


def vision_tokens(vision_config, tile_slots: int) -> int:
    """Vision tokens of one image run as `tile_slots` tiles: patches plus the class token per tile."""
    return tile_slots * ((vision_config.image_size // vision_config.patch_size) ** 2 + 1)


def image_bytes(model_config, setup: Setup, tile_slots: int) -> int:
    """What one image adds to a training step, in bytes.

    The frozen vision tower keeps nothing for backward (`toolkit.model.vision_tower`), so what stays is on the text side:
    the projected vision states (the input of the cross-attention layers' k/v adapters) and, per cross-attention
    layer, the keys and values its attention keeps, the keys also before their RMSNorm (with fp32 copies without
    Liger). On top comes the tower's own forward, freed before the text model runs but live at once for every
    image of the batch: hidden states, the MLP's intermediate, q/k/v, the five intermediate layers it stacks, and
    the encoder's (tokens x tokens) mask.
    """
    vision, text = model_config.vision_config, model_config.get_text_config()
    tokens = vision_tokens(vision, tile_slots)
    b = setup.compute_bytes
    kv = text.num_key_value_heads * (getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    cross_layers = len(getattr(text, "cross_attention_layers", None) or [])
    per_layer = kv * (3 * b + (0 if setup.liger else 8))
    kept = tokens * (text.hidden_size * b + cross_layers * per_layer)
    layers_stacked = len(getattr(vision, "intermediate_layers_indices", None) or []) + 1
    tower = tokens * b * (vision.hidden_size * (5 + layers_stacked) + vision.intermediate_size) + tokens ** 2 * b
    return kept + tower


def cross_attention_token_bytes(text_config, setup: Setup) -> int:
    """What a text token of an image row adds: it also passes the cross-attention decoder layers, which text rows
    skip."""
    cross_layers = len(getattr(text_config, "cross_attention_layers", None) or [])
    if setup.checkpointing:
        return cross_layers * setup.compute_bytes * text_config.hidden_size
    return cross_layers * layer_bytes_per_token(text_config, setup)


def padded(length: int, multiple: int) -> int:
    return math.ceil(length / multiple) * multiple


@dataclass(frozen=True)
class Plan:
    batch_size: int
    weights_gib: float
    per_row_gib: float
    budget_gib: float
    checkpoint_layers: int | None = None  # None: all (or no checkpointing)
    host_gib: float = 0.0  # offloaded layer inputs, in pinned host memory
    held_gib: float = 0.0  # 16-bit decoder weights in host memory while their FP8 copies train

    def peak_gib(self, batch: int | None = None) -> float:
        return self.weights_gib + (batch or self.batch_size) * self.per_row_gib + RESERVE_BYTES / GIB


def fewest_checkpointed(text_config, setup: Setup, tokens: int, batch: int, room: float) -> int | None:
    """The fewest checkpointed self-attention layers with which `batch` rows of `tokens` fit `room` bytes, or
    None when not even all of them do."""
    for layers in range(text_layers(text_config) + 1):
        if batch * tokens * activation_bytes_per_token(text_config, replace(setup, checkpoint_layers=layers)) <= room:
            return layers
    return None


def plan_batch(meta_model, text_config, setup: Setup, longest_row: int, budget_gib: float, rows: int,
               pad_multiple: int = 8, image_row_bytes: int = 0, batch: int | None = None,
               auto_layers: bool = False) -> Plan:
    """The micro-batch (`batch`, or the largest whose longest batch fits `budget_gib`: every row as long as the
    longest and carrying the most images any row has, `image_row_bytes`) and, with `auto_layers`, the fewest
    checkpointed layers with which that batch fits."""
    weights = weight_bytes(meta_model, setup)
    tokens = padded(longest_row, pad_multiple)
    room = budget_gib * GIB - weights - RESERVE_BYTES
    if batch is None:
        per_row = tokens * activation_bytes_per_token(text_config, setup) + image_row_bytes
        batch = min(int(room // per_row), MAX_AUTO_BATCH, max(rows, 1))
        if batch < 1:
            raise ToolkitError(
                f"train.batch_size: auto finds no batch that fits train.memory_budget_gib={budget_gib:g}: the "
                f"weights take {weights / GIB:.1f} GiB and one row of {longest_row} tokens {per_row / GIB:.2f} GiB; "
                "raise the budget, quantize (quantization.mode), or set train.gradient_checkpointing: true or offload"
            )
    if auto_layers:
        layers = fewest_checkpointed(text_config, setup, tokens, batch, room - batch * image_row_bytes)
        if layers is None:
            raise ToolkitError(
                f"train.checkpoint_layers: auto finds no layer count with which {batch} rows of {longest_row} tokens "
                f"fit train.memory_budget_gib={budget_gib:g}; lower train.batch_size or raise the budget")
        setup = replace(setup, checkpoint_layers=layers)
    per_row = tokens * activation_bytes_per_token(text_config, setup) + image_row_bytes
    host = host_bytes(text_config, setup, batch, tokens)
    return Plan(batch, weights / GIB, per_row / GIB, budget_gib, setup.checkpoint_layers, host / GIB,
                held_weight_bytes(text_config, setup) / GIB)


def estimate(recipe, model_config, lengths: list[int], precision: str, images: int = 0,
             tile_slots: int = 0) -> Plan:
    """The memory plan of a recipe whose batch size and checkpointed layers are numbers (or `all`)."""
    from toolkit.model import loading

    setup, longest = Setup.from_recipe(recipe, precision), max(lengths)
    return plan_batch(loading.meta_model(model_config), model_config.get_text_config(), setup, longest,
                      recipe.train.memory_budget_gib, len(lengths), pad_multiple=pad_multiple(precision),
                      image_row_bytes=image_row_bytes(model_config, setup, longest, images, tile_slots),
                      batch=recipe.train.batch_size)


def image_row_bytes(model_config, setup: Setup, longest_row: int, images: int, tile_slots: int) -> int:
    """What the heaviest image row adds beyond a text row of its length: its images and its tokens' passage
    through the cross-attention layers."""
    if not images:
        return 0
    text = model_config.get_text_config()
    return images * image_bytes(model_config, setup, tile_slots) + longest_row * cross_attention_token_bytes(text,
                                                                                                             setup)


def resolve_batch_size(recipe, model_config, lengths: list[int], precision: str, images: int = 0,
                       tile_slots: int = 0):
    """The recipe with `train.batch_size: auto` and `train.checkpoint_layers: auto` replaced by numbers (and that
    plan), or unchanged (and None). The batch is sized first, with every layer checkpointed; then as few layers
    are checkpointed as that batch allows. `images` is the most images a row has and `tile_slots` the tiles each
    runs as (0 for text data)."""
    train = recipe.train
    auto_batch, auto_layers = train.batch_size == "auto", train.checkpoint_layers == "auto"
    if not auto_batch and not auto_layers:
        return recipe, None
    from toolkit.model import loading

    if not lengths:
        raise ToolkitError(f"train.{'batch_size' if auto_batch else 'checkpoint_layers'}: auto needs training rows "
                           "to size the batch by")
    setup = Setup.from_recipe(recipe, precision)
    plan = plan_batch(loading.meta_model(model_config), model_config.get_text_config(), setup, max(lengths),
                      train.memory_budget_gib, len(lengths), pad_multiple=pad_multiple(precision),
                      image_row_bytes=image_row_bytes(model_config, setup, max(lengths), images, tile_slots),
                      batch=None if auto_batch else train.batch_size, auto_layers=auto_layers)
    update = {"batch_size": plan.batch_size}
    if auto_layers:
        update["checkpoint_layers"] = plan.checkpoint_layers
    return recipe.model_copy(update={"train": train.model_copy(update=update)}), plan


# ---- measuring what autograd keeps ----


def saved_tensor_bytes(run, exclude=()) -> int:
    """Bytes of the distinct storages autograd saves for backward while `run()` executes, leaving out the storages
    of `exclude` (the model's parameters: they are kept anyway). It sees what goes through `save_for_backward`
    and autograd's own saving, the same hooks gradient checkpointing uses; tensors an autograd function stores
    as plain attributes of its context (as LLM.int8() does) escape both."""
    import torch

    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(seen.values())


def plan_for(prepared):
    """`resolve_batch_size` for a run `toolkit.training.prepare` checked: sized by its longest row and, with images, by the
    row with the most images, each run as `data.vision_tiles` says."""
    return resolve_batch_size(prepared.recipe, prepared.model_config, prepared.lengths, prepared.precision,
                              *image_load(prepared))


def image_load(prepared) -> tuple[int, int]:
    """(the most images a training row has, the tiles each runs as)."""
    images = prepared.train.max_images
    tile_slots = 0
    if images:
        from toolkit.data import vision

        tile_slots = vision.tile_slots(prepared.recipe.data.vision_tiles, prepared.image_spec.model_max_tiles,
                                       max(prepared.image_tiles.values(), default=1))
    return images, tile_slots


def memory_plan(prepared):
    """(the plan with its recipe's auto settings resolved, a new plan; the memory plan): what `toolkit sft` trains
    and what `toolkit validate` reports. The plan given is left as it is."""
    recipe, plan = plan_for(prepared)
    if plan is None and prepared.lengths:
        plan = estimate(recipe, prepared.model_config, prepared.lengths, prepared.precision, *image_load(prepared))
    return replace(prepared, recipe=recipe), plan


def available_host_bytes() -> int | None:
    """The memory the OS can still give out (MemAvailable in /proc/meminfo); None where that cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def offloaded_bytes(prepared) -> int:
    """Pinned host memory of the offloaded layer inputs of one training process (0 without offloading, or before
    `memory_plan` has resolved `auto` settings: training is given the resolved recipe)."""
    recipe = prepared.recipe
    if recipe.train.gradient_checkpointing != "offload" or not prepared.lengths:
        return 0
    if recipe.train.batch_size == "auto" or recipe.train.checkpoint_layers == "auto":
        return 0
    tokens = padded(max(prepared.lengths), pad_multiple(prepared.precision))
    return host_bytes(prepared.model_config.get_text_config(), Setup.from_recipe(recipe, prepared.precision),
                      recipe.train.batch_size, tokens)


def check_host_memory(prepared, processes: int = 1, available: int | None = None) -> None:
    """Refuse a run whose host memory would not fit the host's free memory: offloaded layer inputs, and the 16-bit
    decoder weights set aside while FP8 copies train (on a GPU; on the CPU they stay where they are). Offloaded
    inputs are pinned, which the OS can neither swap nor reclaim: a run that asks for more than is free is ended by
    the kernel's OOM killer in its first long batch, with no message, or takes the memory of everything else on
    the machine."""
    recipe = prepared.recipe
    pinned = offloaded_bytes(prepared)
    held = 0
    if prepared.device.cuda:
        held = held_weight_bytes(prepared.model_config.get_text_config(), Setup.from_recipe(recipe, prepared.precision))
    need = processes * (pinned + held)
    if not need:
        return
    available = available_host_bytes() if available is None else available
    if available is None or need <= available:
        return
    each = f" ({processes} training processes)" if processes > 1 else ""
    if not held:
        raise ToolkitError(
            f"train.gradient_checkpointing=offload keeps about {shown_bytes(need)} of layer inputs in host "
            f"memory{each} for {recipe.train.batch_size} rows of up to {max(prepared.lengths)} tokens, but this "
            f"machine has {shown_bytes(available)} available; lower train.batch_size or use "
            "train.gradient_checkpointing: true")
    inputs = f"{shown_bytes(processes * pinned)} of offloaded layer inputs and " if pinned else ""
    raise ToolkitError(
        f"training keeps about {shown_bytes(need)} in host memory{each}: {inputs}{shown_bytes(processes * held)} of "
        f"bf16 decoder weights, set aside while train.fp8_matmuls=all trains their FP8 copies; this machine has "
        f"{shown_bytes(available)} available; set train.fp8_matmuls: forward (its weights stay on the GPU)"
        + (" or lower train.batch_size" if pinned else ""))


def shown_bytes(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:.2f} MiB"


def plan_note(plan: Plan, recipe) -> str:
    """One line: the estimated peak, and where checkpointed layers keep their inputs."""
    parts = [f"est. peak {plan.peak_gib():.1f} GiB GPU (weights {plan.weights_gib:.1f}) for {plan.batch_size} rows "
             f"as long as the longest; train.memory_budget_gib={plan.budget_gib:g}"]
    mode = recipe.train.gradient_checkpointing
    if mode:
        layers = "all" if plan.checkpoint_layers is None else str(plan.checkpoint_layers)
        parts.append(f"checkpointed layers: {layers}")
    if mode == "offload":
        parts.append(f"{plan.host_gib:.1f} GiB of layer inputs in host memory")
    if plan.held_gib:
        parts.append(f"{shown_bytes(plan.held_gib * GIB)} of bf16 decoder weights in host memory while their FP8 "
                     "copies train")
    return "; ".join(parts)
