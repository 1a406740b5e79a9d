"""Where checkpointed layers keep their inputs: which decoder layers are checkpointed, and host-memory offloading.

With gradient checkpointing a decoder layer keeps only its input for backward and recomputes the rest; 32 such
inputs are all that remains of a step's activations (docs/benchmarks.md). Two switches build on that:

- `train.gradient_checkpointing: offload` moves each checkpointed input to pinned host memory while the forward
  pass goes on, and brings it back just before backward reaches its layer. The copies run on a side stream, so they
  overlap the layers' compute; GPU memory no longer grows with the number of layers, only with one layer's
  recomputation, so larger batches fit the same memory.
- `train.checkpoint_layers: N` checkpoints only N of the self-attention decoder layers (spread evenly); the others
  keep their activations and skip the recomputation. `auto` picks the fewest that fit the memory budget
  (`toolkit.training.memory`).

Both work through public mechanisms only: transformers' checkpointed layers call their `_gradient_checkpointing_func`
with the layer's positional inputs, `torch.utils.checkpoint` saves those inputs for backward (reentrant or not), and
`torch.autograd.graph.saved_tensors_hooks` decides where anything saved inside its block lives. The hooks are active
only around the checkpoint call in forward: what backward's recomputation saves stays on the GPU.
"""

from __future__ import annotations

import functools
import itertools
import weakref
from dataclasses import dataclass

import torch
from transformers import TrainerCallback

from toolkit.errors import ToolkitError
from toolkit.training import memory

MIN_OFFLOAD_BYTES = 4096  # a smaller saved tensor (a mask, position ids) is not worth a copy


class PinnedBuffers:
    """Host buffers for offloaded tensors, reused across steps whatever a tensor's size.

    PyTorch's pinned-memory cache gives a freed block back only to a request of the same power-of-two size class,
    and each new block is a `cudaHostAlloc`: on an H100 host 32 blocks of 128 MiB took 2.55 s, 32 of 256 MiB 5.09 s
    (docs/benchmarks.md). Layer inputs change size with every length-grouped batch, so a step whose inputs fell in a
    class not seen before stalled for seconds, and every class stayed cached: host memory grew to the sum of all
    classes seen. Here the smallest free buffer large enough is reused, whatever its class. A new buffer is the
    whole block PyTorch reserves anyway (`memory.pinned_block_bytes`), and it takes the place of the largest free
    buffer too small for the request, so the buffers held are what one step at the longest batch so far needs.

    Every buffer is written and read only by copies on one side stream (`HostOffload`), so a buffer given back
    while its last copy is still queued is safe to hand out again: the next copy into it queues behind that one.
    """

    def __init__(self, pin: bool):
        self.pin = pin
        self.free: list[torch.Tensor] = []  # uint8 buffers not in use
        self.held_bytes = 0  # capacity of every buffer, in use or free
        self.peak_held_bytes = 0
        self.allocations = 0

    def take(self, nbytes: int) -> torch.Tensor:
        fitting = [buffer for buffer in self.free if buffer.numel() >= nbytes]
        if fitting:
            buffer = min(fitting, key=torch.Tensor.numel)
            self.free.remove(buffer)
            return buffer
        if self.free:  # all too small: the largest one makes room for the new buffer
            replaced = max(self.free, key=torch.Tensor.numel)
            self.free.remove(replaced)
            self.held_bytes -= replaced.numel()
        capacity = memory.pinned_block_bytes(nbytes)
        buffer = torch.empty(capacity, dtype=torch.uint8, pin_memory=self.pin)
        self.allocations += 1
        self.held_bytes += capacity
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes)
        return buffer

    def give_back(self, buffer: torch.Tensor) -> None:
        self.free.append(buffer)


def host_view(buffer: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """The start of a uint8 `buffer` as a contiguous tensor of `like`'s shape and dtype."""
    nbytes = like.numel() * like.element_size()
    return buffer[:nbytes].view(like.dtype).view(like.shape)


@dataclass
class Saved:
    """One offloaded tensor: its host copy and, once fetched back, its device copy."""

    key: int
    host: torch.Tensor
    device: torch.device
    on_device: torch.Tensor | None = None
    ready: object = None  # CUDA event: the host-to-device copy is done


class HostOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that move what is saved to host memory and bring it back on use.

    On a GPU: pack waits (on a side stream) for the tensor to be produced, copies it into a pinned host buffer
    (`PinnedBuffers`) there, and lets the caching allocator reuse the GPU block once the copy is done
    (`record_stream`); unpack makes the compute stream wait for the tensor's copy back, then starts copying the
    previous saved tensor, which backward needs next, so each copy overlaps a layer's recomputation. On the CPU (no
    streams, no pinning) the same path runs as plain copies into reused host buffers, and unpack returns a copy,
    as the GPU path does, so it is exercised and tested there too.

    Tensors under `min_bytes` stay where they are. `stats` counts what went through, the most that was held in
    host memory at once, and the buffers' capacity and allocations.
    """

    def __init__(self, min_bytes: int = MIN_OFFLOAD_BYTES):
        self.min_bytes = min_bytes
        self.keys = itertools.count()
        self.live: weakref.WeakValueDictionary[int, Saved] = weakref.WeakValueDictionary()
        self.streams: dict[torch.device, object] = {}
        self.buffers: dict[torch.device, PinnedBuffers] = {}  # one set per device: one side stream orders its copies
        self.host_bytes = 0
        self.stats = {"tensors": 0, "bytes": 0, "fetched": 0, "prefetched": 0, "peak_host_bytes": 0}
        super().__init__(self.pack, self.unpack)

    def buffers_for(self, device: torch.device) -> PinnedBuffers:
        if device not in self.buffers:
            self.buffers[device] = PinnedBuffers(pin=device.type == "cuda")
        return self.buffers[device]

    def buffer_stats(self) -> dict:
        """Capacity held by the host buffers (most at once), and how many were allocated."""
        return {"pinned_bytes": sum(b.held_bytes for b in self.buffers.values()),
                "peak_pinned_bytes": sum(b.peak_held_bytes for b in self.buffers.values()),
                "allocations": sum(b.allocations for b in self.buffers.values())}

    # -- pack (forward) --

    def pack(self, tensor: torch.Tensor):
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes < self.min_bytes or tensor.layout is not torch.strided or isinstance(tensor, torch.nn.Parameter):
            return tensor
        if tensor.device.type not in ("cuda", "cpu"):
            return tensor
        buffers = self.buffers_for(tensor.device)
        buffer = buffers.take(nbytes)
        host = host_view(buffer, tensor)
        if tensor.device.type == "cuda":
            self.copy_to_host(tensor, host)
        else:
            host.copy_(tensor.detach())
        saved = Saved(next(self.keys), host, tensor.device)
        self.live[saved.key] = saved
        self.host_bytes += nbytes
        weakref.finalize(saved, self.released, nbytes, buffers, buffer)
        self.stats["tensors"] += 1
        self.stats["bytes"] += nbytes
        self.stats["peak_host_bytes"] = max(self.stats["peak_host_bytes"], self.host_bytes)
        return saved

    def released(self, nbytes: int, buffers: PinnedBuffers, buffer: torch.Tensor) -> None:
        self.host_bytes -= nbytes
        buffers.give_back(buffer)

    def side_stream(self, device: torch.device):
        if device not in self.streams:
            self.streams[device] = torch.cuda.Stream(device)
        return self.streams[device]

    def copy_to_host(self, tensor: torch.Tensor, host: torch.Tensor) -> None:
        side = self.side_stream(tensor.device)
        side.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor must be written before it is read
        with torch.cuda.stream(side):
            host.copy_(tensor.detach(), non_blocking=True)
        tensor.record_stream(side)  # its GPU block is not reused before the copy has read it

    # -- unpack (backward) --

    def unpack(self, saved):
        if not isinstance(saved, Saved):
            return saved
        if saved.device.type != "cuda":
            self.stats["fetched"] += 1
            return saved.host.clone()  # the buffer goes back to the pool once `saved` is released
        if saved.on_device is None:
            self.fetch(saved)
        else:
            self.stats["prefetched"] += 1
        compute = torch.cuda.current_stream(saved.device)
        compute.wait_event(saved.ready)
        tensor, saved.on_device = saved.on_device, None
        tensor.record_stream(compute)  # allocated on the side stream, used and freed on the compute stream
        self.stats["fetched"] += 1
        previous = self.live.get(saved.key - 1)
        if previous is not None and previous.on_device is None:
            self.fetch(previous)
        return tensor

    def fetch(self, saved: Saved) -> None:
        side = self.side_stream(saved.device)
        with torch.cuda.stream(side):
            saved.on_device = saved.host.to(saved.device, non_blocking=True)
            saved.ready = torch.cuda.Event()
            saved.ready.record(side)


# ---- which layers are checkpointed, and how ----


def text_decoder_layers(model) -> list:
    """The self-attention decoder layers a text token passes through, in order (cross-attention layers, which text
    rows skip, and vision layers are left out)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        decoder = base.get_decoder()
    except (AttributeError, NotImplementedError):
        decoder = None
    if getattr(decoder, "layers", None) is None:  # transformers versions differ in what get_decoder returns
        decoder = next((m for name, m in base.named_modules()
                        if name.split(".")[-1] in ("language_model", "model") and hasattr(m, "layers")), None)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ToolkitError(f"{type(base).__name__} has no decoder layers to choose checkpointed layers from")
    cross = set(getattr(decoder, "cross_attention_layers", None) or [])
    return [layer for i, layer in enumerate(layers) if i not in cross]


def spread(count: int, total: int) -> list[bool]:
    """`count` of `total` positions, spread evenly (every k-th for count = total / k)."""
    return [(i + 1) * count // total > i * count // total for i in range(total)]


def offloading(function, hooks: HostOffload):
    """A `_gradient_checkpointing_func` that runs the given one (`torch.utils.checkpoint` with the Trainer's
    arguments) with `hooks` around it: what the checkpoint saves, the layer's inputs, goes to host memory."""

    @functools.wraps(function)
    def checkpoint(*args, **kwargs):
        with hooks:
            return function(*args, **kwargs)

    checkpoint.offloads_to = hooks
    return checkpoint


def apply(model, offload: bool, layers: int | None) -> dict:
    """Set the model's checkpointing as the recipe says, on top of what the Trainer enabled: every checkpointed
    layer's function wrapped in `HostOffload` (`offload`), and only `layers` of the self-attention decoder layers
    checkpointed (None: all). Returns what it set: the hooks (or None) and the checkpointed layer count."""
    checkpointed = [m for m in model.modules() if getattr(m, "gradient_checkpointing", False)
                    and callable(getattr(m, "_gradient_checkpointing_func", None))]
    if not checkpointed:
        raise ToolkitError("gradient checkpointing is not on in this model, so there is nothing to offload or "
                           "choose layers from")
    text = text_decoder_layers(model)
    if layers is not None:
        if not 0 <= layers <= len(text):
            raise ToolkitError(f"train.checkpoint_layers={layers}, but the model has {len(text)} self-attention "
                               "decoder layers")
        for layer, keep in zip(text, spread(layers, len(text))):
            layer.gradient_checkpointing = keep
    hooks = None
    if offload:
        hooks = HostOffload()
        for module in checkpointed:
            function = module._gradient_checkpointing_func
            if getattr(function, "offloads_to", None) is None:
                module._gradient_checkpointing_func = offloading(function, hooks)
    return {"hooks": hooks, "checkpointed": sum(bool(layer.gradient_checkpointing) for layer in text),
            "text_layers": len(text)}


class CheckpointingCallback(TrainerCallback):
    """Applies `apply` when training begins: the Trainer turns gradient checkpointing on inside `train()`, before
    its callbacks' `on_train_begin`, and would overwrite anything set earlier."""

    def __init__(self, offload: bool, layers: int | None):
        self.offload, self.layers = offload, layers
        self.applied: dict | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.applied = apply(model, self.offload, self.layers)
        return control


def recipe_layers(train) -> int | None:
    """The recipe's checkpointed layer count (None: all); `auto` must have been resolved by `toolkit.training.memory`."""
    value = train.checkpoint_layers
    if value == "all":
        return None
    if value == "auto":
        raise ToolkitError("train.checkpoint_layers: auto must be resolved against the memory budget before training")
    return value


def callback_for(train) -> CheckpointingCallback | None:
    """The callback a recipe's checkpointing needs beyond the Trainer's own, or None (plain checkpointing or none)."""
    offload = train.gradient_checkpointing == "offload"
    layers = recipe_layers(train) if train.gradient_checkpointing else None
    if not offload and layers is None:
        return None
    return CheckpointingCallback(offload, layers)


def check_strategy(train, strategy: str) -> None:
    """Offloading, chosen layers and regional compilation wrap the replicated model's layers; FSDP and ZeRO-3 wrap
    them their own way (FSDP checkpoints through its own wrapper), so a recipe asking for both is refused."""
    asks = train.gradient_checkpointing == "offload" or train.checkpoint_layers != "all" or train.compile
    if asks and strategy != "ddp":
        raise ToolkitError("train.gradient_checkpointing: offload, train.checkpoint_layers and train.compile run with "
                           f"--strategy ddp; --strategy {strategy} wraps the layers its own way")
