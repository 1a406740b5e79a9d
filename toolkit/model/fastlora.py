"""LoRA layers, and frozen 8-bit layers, each run as one autograd function that keeps only what backward needs.

Why this exists (each point measured in docs/benchmarks.md):

- PEFT runs an adapted layer as `base(x) + lora_B(lora_A(dropout(x))) * scale`, five modules and about ten
  kernels. Autograd keeps what each of them saves: with dropout, a dropped-out copy of `x` and its mask for every
  adapted layer (q, k and v read the same `x` but drop it out three times), and on 4-bit layers a clone of the base
  output. Here one function computes the same sum and keeps the input (one tensor, shared by q, k and v), the
  rank-r product `dropout(x) @ A^T`, and the random-generator state that rebuilds the dropout mask in backward.
- bitsandbytes' 8-bit matmul (LLM.int8()) quantizes every activation to int8 in fp16, keeps every input alive for
  backward although the weights are frozen, and its backward dequantizes the weight anyway. Here an 8-bit weight is
  dequantized to the compute dtype for a plain matmul, forward and backward, and no input is kept: the 8-bit
  weights stay 8-bit in memory, only the arithmetic is bf16 (no activation quantization, so no outlier threshold).
- 4-bit weights are dequantized with bitsandbytes' public `dequantize_4bit`, as its own matmul does for large
  batches; the difference is only in what the LoRA half keeps.
- A frozen bf16/fp32 `nn.Linear` (the MLP of LoRA on attention) keeps nothing either. Through `F.linear` autograd
  keeps a view of its weight, and that matters under gradient checkpointing: backward's recomputation of a layer
  stops once it has remade everything the forward kept (`torch.utils.checkpoint`'s early stop), so the MLP's last
  projection, which is run only to remake that view, is skipped (as it already is for 4-bit and 8-bit layers).

The functions are installed for the duration of `fused_layers(...)` by giving each eligible module an instance
`forward`; anything they do not cover (merged or disabled adapters, several active adapters, DoRA and other
variants, LoRA biases, other base layer types, no gradients) goes through PEFT's own forward unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F

from toolkit.model import fp8 as fp8_matmuls

INT8_SCALE = 1.0 / 127.0  # LLM.int8() stores each row as round(w / max|row| * 127) with max|row| in SCB


# ---- weights ----


def weight_kind(layer) -> str | None:
    """'dense', '4bit' or '8bit' for the base layers this module can run, else None (left to PEFT/bitsandbytes)."""
    if type(layer) is torch.nn.Linear:
        return "dense"
    try:
        import bitsandbytes as bnb
    except ImportError:
        return None
    if isinstance(layer, bnb.nn.Linear4bit) and getattr(layer.weight, "quant_state", None) is not None:
        return "4bit"
    if isinstance(layer, bnb.nn.Linear8bitLt) and not layer.state.has_fp16_weights and int8_parts(layer)[0] is not None:
        return "8bit"
    return None


def int8_parts(layer) -> tuple:
    """(int8 rows, per-row absmax) of a bitsandbytes 8-bit layer: on the weight before its first forward, on its
    matmul state after (bitsandbytes moves them there)."""
    weight, state = layer.weight, layer.state
    rows = state.CB if state.CB is not None else getattr(weight, "CB", None)
    absmax = state.SCB if state.SCB is not None else getattr(weight, "SCB", None)
    if rows is None and absmax is not None and weight.dtype == torch.int8:
        rows = weight.data
    return rows, absmax


def dequantize_int8(rows: torch.Tensor, absmax: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int8 rows x (absmax / 127) in one kernel, computed in fp32 and rounded once to `dtype`.

    bitsandbytes' public `int8_vectorwise_dequant` returns fp32 (twice the bytes of bf16, then a second kernel to
    cast), so the product is written here directly into a `dtype` tensor.
    """
    out = torch.empty(rows.shape, dtype=dtype, device=rows.device)
    return torch.mul(rows, (absmax.float() * INT8_SCALE).unsqueeze(1), out=out)


def dense_weight(layer, kind: str, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight as a `dtype` matrix (out_features x in_features); a temporary for quantized layers."""
    if kind == "dense":
        return layer.weight if layer.weight.dtype == dtype else layer.weight.to(dtype)
    if kind == "4bit":
        import bitsandbytes.functional as bnb_functional

        weight = bnb_functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        return weight if weight.dtype == dtype else weight.to(dtype)
    rows, absmax = int8_parts(layer)
    return dequantize_int8(rows, absmax, dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the matmuls run in: autocast's where it is on (as for any nn.Linear), else the input's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def frozen_bias(layer, dtype):
    return None if layer.bias is None else layer.bias.to(dtype)


RESIDENT = "toolkit_fp8_weight"  # attribute of a frozen nn.Linear whose weight is held in FP8 (`hold_in_fp8`)


def resident(layer):
    """The layer's `fp8.ResidentWeight` while `fused_layers` holds its weight in FP8, else None."""
    return vars(layer).get(RESIDENT)


def base_product(source: torch.Tensor, flat: torch.Tensor, layer, kind: str, dtype, fp8_mode: str) -> torch.Tensor:
    """`flat @ W^T + b` for the frozen base layer, through FP8 unless `fp8_mode` is none (`source`: the tensor
    `flat` was reshaped from, by which q, k and v share one quantization of their common input)."""
    held = resident(layer)
    weight = held if held is not None else dense_weight(layer, kind, dtype)
    bias = frozen_bias(layer, dtype)
    if fp8_mode == "none":
        return F.linear(flat, weight, bias)
    return fp8_matmuls.linear(flat, weight, bias, rows=fp8_matmuls.LAST_INPUT.get(source, flat))


def base_input_grad(grad: torch.Tensor, layer, kind: str, dtype, fp8_mode: str) -> torch.Tensor:
    """`grad @ W` for a 2-D `grad`, through FP8 when `fp8_mode` is all."""
    held = resident(layer)
    weight = held if held is not None else dense_weight(layer, kind, dtype)
    return fp8_matmuls.input_grad(grad, weight) if fp8_mode == "all" else grad @ weight


# ---- dropout whose mask is rebuilt, not stored ----


def rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def set_rng_state(state: torch.Tensor, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.set_rng_state(state, device)
    else:
        torch.set_rng_state(state)


def dropout(x: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(dropout(x), keep mask) in one kernel on a GPU, drawn from the device's default generator.

    `native_dropout` draws, masks and scales in one pass over `x` (mask, multiply and scale as separate ops cost
    three passes and a tensor of random numbers). The default generator, not a private one, so that gradient
    checkpointing, which restores it before recomputing a layer, redraws the same mask in the recomputation.
    """
    return torch.native_dropout(x, p, True)


def rebuilt_dropout(x: torch.Tensor, p: float, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """What `dropout(x, p)` returned when the generator was at `state`, leaving the generator where it is now.

    The same input tensor is passed again, so the kernel maps random numbers to elements the way it did then.
    """
    now = rng_state(x.device)
    set_rng_state(state, x.device)
    try:
        return dropout(x, p)
    finally:
        set_rng_state(now, x.device)


# ---- autograd functions ----


class FrozenLinearFunction(torch.autograd.Function):
    """`x @ W^T + b` for a frozen `W` (a quantized one dequantized in forward and again in backward); keeps neither
    the input nor a view of the weight, so autograd sees nothing saved."""

    @staticmethod
    def forward(ctx, x, layer, kind, fp8_mode):
        dtype = compute_dtype(x)
        ctx.layer, ctx.kind, ctx.dtype, ctx.fp8_mode = layer, kind, dtype, fp8_mode
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        out = base_product(x, flat, layer, kind, dtype, fp8_mode)
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        g = grad.reshape(-1, grad.shape[-1]).to(ctx.dtype)
        grad_x = base_input_grad(g, ctx.layer, ctx.kind, ctx.dtype, ctx.fp8_mode)
        return grad_x.view(*grad.shape[:-1], grad_x.shape[-1]), None, None, None


class LoraLinearFunction(torch.autograd.Function):
    """`base(x) + scale * dropout(x) @ A^T @ B^T` with frozen base weights and trainable A (r x in), B (out x r).

    Saved for backward: x, u = dropout(x) @ A^T (r wide), A and B (parameters, no copies) and, with dropout, the
    generator state the mask was drawn from. Gradients: dB = scale g^T u, dA = (scale g B)^T dropout(x),
    dx = g W + mask/(1-p) * (scale g B) A; the base weight is dequantized again rather than kept. Backward redraws
    dropout(x) and its mask in one kernel, and the matmul g W adds the adapter's term in its epilogue.
    """

    @staticmethod
    def forward(ctx, x, lora_a, lora_b, layer, kind, scale, p, fp8_mode):
        dtype = compute_dtype(x)
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        out = base_product(x, flat, layer, kind, dtype, fp8_mode)
        state = None
        dropped = flat
        if p > 0:
            state = rng_state(x.device)
            dropped = dropout(flat, p)[0]
        u = dropped @ lora_a.to(dtype).t()
        out.addmm_(u, lora_b.to(dtype).t(), alpha=scale)
        ctx.save_for_backward(x, u, lora_a, lora_b)
        ctx.layer, ctx.kind, ctx.dtype, ctx.scale, ctx.p, ctx.state = layer, kind, dtype, scale, p, state
        ctx.fp8_mode = fp8_mode
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x, u, lora_a, lora_b = ctx.saved_tensors
        dtype, scale, p = ctx.dtype, ctx.scale, ctx.p
        flat = x.reshape(-1, x.shape[-1]).to(dtype)
        g = grad.reshape(-1, grad.shape[-1]).to(dtype)
        a, b = lora_a.to(dtype), lora_b.to(dtype)
        gu = (g @ b).mul_(scale)  # gradient reaching u, n x r
        dropped, mask = rebuilt_dropout(flat, p, ctx.state) if p > 0 else (flat, None)
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = (g.t() @ u).mul_(scale).to(lora_b.dtype)
        if ctx.needs_input_grad[1]:
            grad_a = (gu.t() @ dropped).to(lora_a.dtype)
        if ctx.needs_input_grad[0]:
            if mask is None:
                grad_x = base_input_grad(g, ctx.layer, ctx.kind, dtype, ctx.fp8_mode).addmm_(gu, a)
            else:
                adapter = torch.ops.aten.native_dropout_backward(gu @ a, mask, 1.0 / (1.0 - p))
                if ctx.fp8_mode == "all":
                    grad_x = base_input_grad(g, ctx.layer, ctx.kind, dtype, ctx.fp8_mode).add_(adapter)
                else:
                    grad_x = torch.addmm(adapter, g, dense_weight(ctx.layer, ctx.kind, dtype))
            grad_x = grad_x.view(x.shape).to(x.dtype)
        return grad_x, grad_a, grad_b, None, None, None, None, None


# ---- installing them ----


def lora_dropout_p(module, adapter: str) -> float:
    dropout = module.lora_dropout[adapter]
    return float(dropout.p) if isinstance(dropout, torch.nn.Dropout) and dropout.training else 0.0


def single_adapter(module) -> str | None:
    """The one plain LoRA adapter this call would run, or None when PEFT's forward must handle the call."""
    if module.disable_adapters or module.merged or len(module.active_adapters) != 1:
        return None
    adapter = module.active_adapters[0]
    if adapter not in module.lora_A or adapter in getattr(module, "lora_variant", {}):
        return None
    if module.lora_B[adapter].bias is not None:
        return None
    return adapter


def repacked(layer, kind: str) -> bool:
    """bitsandbytes repacks a 4-bit weight for its CPU kernel after an inference call on the CPU; only its own
    matmul reads that layout."""
    return kind == "4bit" and getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


def make_lora_forward(module, kind: str, fp8_mode: str = "none"):
    peft_forward = module.forward
    base = module.get_base_layer()

    def forward(x, *args, **kwargs):
        adapter = None if args or kwargs or not torch.is_grad_enabled() else single_adapter(module)
        if adapter is None or (base.bias is not None and base.bias.requires_grad) or repacked(base, kind):
            return peft_forward(x, *args, **kwargs)
        return LoraLinearFunction.apply(x, module.lora_A[adapter].weight, module.lora_B[adapter].weight, base, kind,
                                        module.scaling[adapter], lora_dropout_p(module, adapter), fp8_mode)

    return forward


def make_frozen_forward(module, kind: str, fp8_mode: str = "none"):
    own_forward = module.forward

    def forward(x, *args, **kwargs):
        if resident(module) is not None:  # its bf16 weight is away: every call, with gradients or not, runs here
            return FrozenLinearFunction.apply(x, module, kind, fp8_mode)
        if args or kwargs or not torch.is_grad_enabled() or module.weight.requires_grad or \
                (module.bias is not None and module.bias.requires_grad) or repacked(module, kind):
            return own_forward(x, *args, **kwargs)
        return FrozenLinearFunction.apply(x, module, kind, fp8_mode)

    return forward


def lora_linear_modules(model):
    """(name, module, kind) for every LoRA layer over a base layer this module can run."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and hasattr(module, "base_layer"):
            kind = weight_kind(module.get_base_layer())
            if kind is not None and not getattr(module, "fan_in_fan_out", False):
                yield name, module, kind


def frozen_int8_modules(model):
    """(name, module) for every bitsandbytes 8-bit layer, adapted or not (a LoRA layer that falls back to PEFT's
    forward still calls its base layer)."""
    for name, module in model.named_modules():
        if weight_kind(module) == "8bit":
            yield name, module


def frozen_4bit_modules(model):
    """(name, module) for every bitsandbytes 4-bit layer, adapted or not; switched only for FP8 (bitsandbytes' own
    4-bit matmul already dequantizes and keeps nothing, so otherwise there is nothing to gain)."""
    for name, module in model.named_modules():
        if weight_kind(module) == "4bit":
            yield name, module


def frozen_dense_modules(model):
    """(name, module) for every plain `nn.Linear` whose weight is frozen (LoRA's base layers included: PEFT's own
    forward, where it is still used, calls them)."""
    for name, module in model.named_modules():
        if type(module) is torch.nn.Linear and not module.weight.requires_grad:
            yield name, module


def patchable(module) -> bool:
    """No one else (e.g. accelerate's device hooks) has replaced this module's forward."""
    return "forward" not in vars(module) and not hasattr(module, "_hf_hook")


def fp8_scope(layers, fp8_mode: str):
    """A test for which modules multiply in FP8: the linear layers inside `layers` (the decoder's self-attention
    layers: not the LM head, whose logits the loss reads directly, nor the vision tower) whose weight shape
    `torch._scaled_mm` takes."""
    inside = set() if fp8_mode == "none" else {id(m) for layer in layers or () for m in layer.modules()}

    def mode(module) -> str:
        base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
        shape_ok = fp8_matmuls.fits(getattr(base, "in_features", 1), getattr(base, "out_features", 1))
        return fp8_mode if id(module) in inside and shape_ok else "none"

    return mode


def holdable(module, fp8_mode: str) -> bool:
    """A frozen plain linear layer whose every product runs in FP8 (`all`) from a 16-bit weight: its bf16 weight is
    then needed by nothing while training, and can give its GPU memory to the two e4m3 copies."""
    weight = module.weight
    return (fp8_mode == "all" and type(module) is torch.nn.Linear and not weight.requires_grad
            and (module.bias is None or not module.bias.requires_grad)
            and weight.dtype in (torch.bfloat16, torch.float16) and weight.dim() == 2)


def hold_in_fp8(module, held: list) -> None:
    """Quantize the module's weight once (`fp8.ResidentWeight`) and move the 16-bit matrix to host memory (on the
    CPU it stays where it is; only the parameter is emptied, so that nothing can read it by mistake); `held` gets
    (module, the matrix) for `give_back`."""
    weight = module.weight
    quantized = fp8_matmuls.ResidentWeight(weight.data)
    away = set_aside(weight.data)
    held.append((module, away))  # from here on `give_back` restores it, whatever fails next
    weight.data = weight.data.new_empty(0)
    vars(module)[RESIDENT] = quantized


def set_aside(matrix: torch.Tensor) -> torch.Tensor:
    """A GPU matrix copied to host memory; a CPU one as it is."""
    return matrix.to("cpu") if matrix.is_cuda else matrix


def give_back(held: list) -> None:
    """Put every held weight back on its module's device and drop the e4m3 copies."""
    while held:
        module, away = held.pop()
        module.weight.data = away.to(module.weight.device)
        vars(module).pop(RESIDENT, None)


@contextmanager
def fused_layers(model, *, lora: bool, int8_dequantize: bool, frozen_dense: bool = False, fp8: str = "none",
                 fp8_layers=None):
    """Run LoRA layers (`lora`), bitsandbytes 8-bit layers (`int8_dequantize`), frozen dense linear layers
    (`frozen_dense`) and, with FP8, bitsandbytes 4-bit layers through the functions above for the duration of the
    block, those inside `fp8_layers` with their frozen matmuls in FP8 (`fp8`: forward, or all, the input gradient
    too); returns how many modules of each were switched ("fp8": how many of those multiply in FP8; "fp8_held":
    how many frozen dense layers hold their weight in FP8 for the block, their bf16 weights in host memory)."""
    patched, held = [], []
    counts = {"lora": 0, "int8": 0, "nf4": 0, "dense": 0, "fp8": 0, "fp8_held": 0}
    mode = fp8_scope(fp8_layers, fp8)

    def switch(module, make, kind, count):
        fp8_mode = mode(module)
        module.forward = make(module, kind, fp8_mode)
        patched.append(module)
        counts[count] += 1
        counts["fp8"] += fp8_mode != "none"
        if count == "dense" and holdable(module, fp8_mode):
            hold_in_fp8(module, held)
            counts["fp8_held"] += 1

    try:
        if lora:
            for _, module, kind in list(lora_linear_modules(model)):
                if (kind != "8bit" or int8_dequantize) and patchable(module):
                    switch(module, make_lora_forward, kind, "lora")
        frozen = ((int8_dequantize, frozen_int8_modules, "8bit", "int8"),
                  (fp8 != "none", frozen_4bit_modules, "4bit", "nf4"),
                  (frozen_dense, frozen_dense_modules, "dense", "dense"))
        for wanted, modules, kind, count in frozen:
            for _, module in list(modules(model)) if wanted else ():
                if patchable(module):
                    switch(module, make_frozen_forward, kind, count)
        yield counts
    finally:
        fp8_matmuls.LAST_INPUT.clear()
        give_back(held)
        for module in patched:
            del module.forward


def paths_on(recipe, strategy: str = "ddp") -> dict:
    """Which layers this module runs for a recipe: its LoRA layers (`train.fused_lora`), its 8-bit layers
    (`quantization.int8_matmul: dequantize`), frozen dense layers with gradient checkpointing (a recomputation
    saved; nothing else changes) or FP8 matmuls (they are where the FP8 product runs), and `train.fp8_matmuls`. All
    read whole weights, so they run only where every process holds them (one process or DDP); under FSDP and ZeRO-3
    PEFT's, bitsandbytes' and PyTorch's own layers run (and `check_fp8` refuses FP8 there). `lora.upcast_inputs`
    asks for PEFT's casting, which only PEFT's layers do. Training and the memory plan both ask here."""
    replicated = strategy == "ddp"
    fp8 = recipe.train.fp8_matmuls if replicated else "none"
    return {"lora": replicated and recipe.train.fused_lora and not recipe.lora.upcast_inputs,
            "int8_dequantize": replicated and recipe.quantization.int8_matmul == "dequantize",
            "frozen_dense": replicated and (bool(recipe.train.gradient_checkpointing) or fp8 != "none"),
            "fp8": fp8}


def fp8_problem(recipe, strategy: str = "ddp") -> str | None:
    """Why `train.fp8_matmuls` cannot run as asked, or None: FP8 runs inside this module's layers only, so it needs
    them for the adapted layers too and whole weights in every process."""
    if recipe.train.fp8_matmuls == "none":
        return None
    key = f"train.fp8_matmuls={recipe.train.fp8_matmuls}"
    if strategy != "ddp":
        return f"{key} needs whole weights in every process; {strategy} shards them: set it to none"
    if not recipe.train.fused_lora:
        return f"{key} runs inside the toolkit's LoRA layers; set train.fused_lora: true or fp8_matmuls: none"
    if recipe.lora.upcast_inputs:
        return f"{key} runs inside the toolkit's LoRA layers, which lora.upcast_inputs turns off; set one of them off"
    if recipe.quantization.mode == "8bit" and recipe.quantization.int8_matmul != "dequantize":
        return f"{key} needs quantization.int8_matmul: dequantize (LLM.int8() runs its own matmul)"
    return None
