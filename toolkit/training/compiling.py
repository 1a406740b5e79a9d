"""`train.compile: true`: regional `torch.compile` of the self-attention decoder layers, with a persistent cache.

Compiling the whole model traces 40 layers and every input length anew; an earlier attempt compiled for more than
ten minutes. Here each self-attention decoder layer is compiled on its own (`nn.Module.compile`): the layers share
one code object, so the compiled block is reused across layers instead of traced 32 times, and `dynamic=True`
marks the sequence length symbolic from the first call, so a new padded length reuses the same graph instead of
recompiling. Inductor's compiled graphs are kept under the toolkit cache (`compile/`), so a second run loads them
instead of compiling again. Off by default: docs/benchmarks.md says what it measured.
"""

from __future__ import annotations

import os

from toolkit.model import builtin
from toolkit.training.activations import text_decoder_layers

BACKEND = "inductor"


def cache_dir():
    return builtin.cache_root() / "compile"


def use_persistent_cache() -> None:
    """Point Inductor's on-disk caches (compiled graphs, autotuning, Triton kernels) at the toolkit cache, unless
    the user has chosen a place already."""
    folder = cache_dir()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(folder))
    os.environ.setdefault("TRITON_CACHE_DIR", str(folder / "triton"))
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")


def compile_layers(model) -> list:
    """Compile every self-attention decoder layer in place; returns them (for `uncompile`)."""
    use_persistent_cache()
    layers = text_decoder_layers(model)
    for layer in layers:
        layer.compile(backend=BACKEND, dynamic=True)
    return layers


def uncompile(layers) -> None:
    """Back to the eager layers (`nn.Module.compile` keeps the compiled call beside the module's own)."""
    for layer in layers:
        layer._compiled_call_impl = None
