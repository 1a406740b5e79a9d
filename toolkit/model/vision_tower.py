"""How the vision tower of Llama 3.2 Vision (Mllama) runs under the toolkit: same results, less work.

Three things transformers' Mllama does that cost time or memory without changing what is learned:

1. **Autograd through a frozen tower.** With PEFT and gradient checkpointing TRL calls
   `model.enable_input_require_grads()`, which hooks every input embedding, the vision tower's patch embedding
   included. The tower's output then requires grad, so its 40 checkpointed layers keep inputs and run backward
   though nothing in them trains. `keep_frozen_tower_out_of_autograd` removes that one hook when no parameter of
   the tower trains (`lora.scope: language`); adapters in the cross-attention layers and the projector still get
   their gradients, which flow from the text side.

2. **Attention over a dense mask.** The encoder's mask (`_prepare_aspect_ratio_attention_mask`, as in Meta's
   reference code) hides a key from a query only when both are padding (the 7 padding patches that round a tile's
   1,601 tokens up to 1,608, and every token of a padded tile): a real token reads every key, padding included; a
   padding token reads the real keys only. SDPA given that float mask cannot use its flash kernel, and computes
   every pair. `split_attention` computes exactly the same thing as two unmasked attentions per group of images
   with the same padding: real queries over their keys, padding queries over the real keys (flash-capable, and a
   1-tile image's 4,824 padded-tile queries read 1,601 keys instead of 6,432).

3. **Tiles an image does not fill.** transformers pads every image to the model's 4 tiles. `data.vision_tiles:
   filled` runs only the tiles the batch's images fill (a drawing in one 560-px tile: a quarter of the tokens).
   This is *not* the padded computation: there, a real token also reads the padded tiles' tokens (content-free,
   made of the class and position embeddings), which the model saw in pretraining. "filled" hides them instead, so
   an image's features no longer depend on how many tiles it was padded to; run with "filled", a 1-tile image gives
   the same features whether its batch has 1 or 4 tile slots. The run's eval, generate and merge check use the same
   tiling; serving engines compute the padded one, so "padded" stays the default.
"""

from __future__ import annotations

import functools

PADDED, FILLED = "padded", "filled"
ATTENTION = {PADDED: "toolkit_vision_split", FILLED: "toolkit_vision_split_filled"}


def vision_model(model):
    """The Mllama vision tower inside a model (PEFT-wrapped or not), or None for a text model."""
    for name, module in model.named_modules():
        if name.endswith("vision_model") and hasattr(module, "patch_embedding"):
            return module
    return None


def tokens_per_tile(vision_config) -> int:
    """A tile's tokens as the encoder lays them out: the patches and the class token, rounded up to a multiple of 8."""
    tokens = (vision_config.image_size // vision_config.patch_size) ** 2 + 1
    return -(-tokens // 8) * 8


# --- 1. autograd ---------------------------------------------------------------------------------------------------

def keep_frozen_tower_out_of_autograd(model) -> bool:
    """When no parameter of the vision tower trains, remove the input-grad hook `enable_input_require_grads` put
    on its patch embedding, and keep it from coming back: transformers calls `enable_input_require_grads` again
    each time checkpointing is enabled (the Trainer does at the start of `train()`), and skips a model whose
    `get_input_embeddings` is None, which the tower's now is. Returns whether the tower was taken out."""
    tower = vision_model(model)
    if tower is None or any(p.requires_grad for p in tower.parameters()):
        return False
    hooks_on_patches = tower.patch_embedding._forward_hooks
    for module in model.modules():
        for handle in getattr(module, "_require_grads_hooks", None) or []:
            if handle.id in hooks_on_patches:
                handle.remove()
    tower.get_input_embeddings = lambda: None
    return True


# --- 2. attention ------------------------------------------------------------------------------------------------

def split_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, filled=False, **kwargs):
    """The vision encoder's attention, exactly as its padding mask defines it, without the mask.

    `attention_mask` is the encoder's (images, 1, L, L) float mask. Images are grouped by their padding, and each
    group runs two unmasked SDPA calls: real queries over every key (over the keys outside padded tiles when
    `filled`), padding queries over the real keys. Returns (images, L, heads, head_dim) as transformers expects.
    """
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    if attention_mask is None or attention_mask.dim() != 4:
        return _plain(query, key, value, attention_mask, scaling)
    per_tile = tokens_per_tile(module.config) if filled else 0
    output = None
    for images, parts in _attention_plan(attention_mask, per_tile):
        q, k, v = (query, key, value) if images is None else (query[images], key[images], value[images])
        out = q.new_empty(q.shape) if len(parts) > 1 or parts[0][0] is not None else None
        for rows, cols in parts:
            part = sdpa(q if rows is None else q[:, :, rows], k if cols is None else k[:, :, cols],
                        v if cols is None else v[:, :, cols], scale=scaling)
            if out is None:
                out = part
            else:
                out[:, :, rows] = part
        if images is None:
            output = out
        else:
            if output is None:
                output = query.new_empty(query.shape)
            output[images] = out
    return output.transpose(1, 2).contiguous(), None


_PLANS: dict = {}  # per tiling: (weak reference to the mask it was made for, the plan)


def _attention_plan(attention_mask, per_tile: int) -> list:
    """Which SDPA calls `split_attention` makes for a mask: [(images or None for all, [(query rows or None for
    all, key columns or None for all), ...]), ...] as index tensors on the mask's device.

    Every encoder layer of a forward gets the same mask tensor, so the plan is made once per forward, on the CPU:
    made on the GPU in each of the 40 layers (a row-wise `torch.unique` and a dozen `nonzero` syncs) it took more
    time than the attention itself (H100, 4-tile images, batch 16: 2.2 of 3.7 s a step). Which positions are padding
    is read from the mask's diagonal (a position is masked from itself only when it is padding); with `per_tile`
    (filled tiles) real queries also skip the tokens of padded tiles."""
    import weakref

    import torch

    cached = _PLANS.get(per_tile)
    if cached is not None and cached[0]() is attention_mask:
        return cached[1]
    length = attention_mask.shape[-1]
    padding = (attention_mask.diagonal(dim1=-2, dim2=-1)[:, 0] < 0).cpu()  # (images, L)
    hidden = torch.zeros_like(padding)
    if per_tile:
        hidden = padding[:, ::per_tile].repeat_interleave(per_tile, dim=1)[:, :length]  # tokens of padded tiles
    patterns, group_of = torch.unique(torch.cat([padding, hidden], dim=1), dim=0, return_inverse=True)

    def index(mask):
        return None if bool(mask.all()) else mask.nonzero().squeeze(1).to(attention_mask.device, non_blocking=True)

    plan = []
    for group, pattern in enumerate(patterns):
        pad, hide = pattern[:length], pattern[length:]
        parts = [(index(queries), index(keys)) for queries, keys in ((~pad, ~hide), (pad, ~pad)) if queries.any()]
        plan.append((index(group_of == group), parts))
    _PLANS[per_tile] = (weakref.ref(attention_mask), plan)
    return plan


def _plain(query, key, value, mask, scaling):
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    return sdpa(query, key, value, attn_mask=mask, scale=scaling).transpose(1, 2).contiguous(), None


@functools.cache
def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION[PADDED], split_attention)
    AttentionInterface.register(ATTENTION[FILLED], functools.partial(split_attention, filled=True))


# --- 3. tiles ------------------------------------------------------------------------------------------------------

def _fit_tiles(forward, max_tiles: int):
    """A tile embedding's forward for fewer tiles than the model's: pad the hidden states with zero tiles, run the
    module's own forward (which reshapes its embedding to the model's tile count), keep the tiles given."""
    import torch.nn.functional as F

    def fitted(hidden_states, aspect_ratio_ids):
        tiles = hidden_states.shape[1]
        if tiles == max_tiles:
            return forward(hidden_states, aspect_ratio_ids)
        padded = F.pad(hidden_states, (0, 0, 0, 0, 0, max_tiles - tiles))
        return forward(padded, aspect_ratio_ids)[:, :tiles]

    return fitted


def accept_fewer_tiles(tower) -> None:
    """Let the tower take images of fewer tile slots than the model's: its three tile embeddings reshape to the
    model's count. The position embeddings of tile t are the same whichever count is passed, so slicing them is
    exact."""
    if getattr(tower, "toolkit_fewer_tiles", False):
        return
    for name in ("pre_tile_positional_embedding", "post_tile_positional_embedding", "gated_positional_embedding"):
        module = getattr(tower, name)
        module.forward = _fit_tiles(module.forward, tower.max_num_tiles)
    tower.toolkit_fewer_tiles = True


def prepare(model, tiling: str = PADDED, attn_implementation: str = "sdpa") -> None:
    """Set up a loaded model's vision tower for `data.vision_tiles`: the split attention where the recipe asks for
    SDPA (eager and flash-attention recipes keep theirs, "filled" needs the split), and fewer tile slots for
    "filled". A text model is left alone."""
    tower = vision_model(model)
    if tower is None:
        return
    if attn_implementation == "sdpa" or tiling == FILLED:
        register_attention()
        tower.config._attn_implementation = ATTENTION[tiling]
    if tiling == FILLED:
        accept_fewer_tiles(tower)
