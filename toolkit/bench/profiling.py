"""Where a training step's time goes: a torch.profiler window over a few optimizer steps, reduced to a short
table (GPU kernel time by kind, the time the GPU sits idle and which part of the step the CPU was in then, and the
calls that make the CPU wait for the GPU).

`toolkit bench --profile` uses it; the labels come from `toolkit.training.trainer.sft_trainer_class` (forward + loss,
forward + loss + backward) and from the callback below (step, optimizer).
"""

from __future__ import annotations

from collections import defaultdict

from transformers import TrainerCallback

STEP, OPTIMIZER = "toolkit: step", "toolkit: optimizer"
FORWARD, TRAINING_STEP = "toolkit: forward + loss", "toolkit: forward + loss + backward"

# Kernel name fragments, first match wins. cuBLAS/CUTLASS GEMMs are the model's (and LoRA's) matmuls. TRL's fused LM
# head folds logits tiles in two Triton kernels named exactly `_forward_kernel` and `_backward_kernel`.
LM_HEAD_KERNELS = ("_forward_kernel", "_backward_kernel")
KERNEL_KINDS = (
    ("norm/rope/swiglu (Liger)", ("rms_norm", "rope", "swiglu", "liger", "_layer_norm")),
    ("attention", ("fmha", "flash", "attention", "sdpa", "cudnn", "cutlassF", "cutlassB")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "sm80_", "cublas", "splitk")),
    ("dequantize", ("dequant", "kDequantize", "int8_vectorwise", "int8_mm", "igemm", "gemm_4bit")),
    ("optimizer", ("adam", "multi_tensor", "foreach", "fused_sgd")),
    ("random (dropout)", ("bernoulli", "philox", "dropout", "distribution", "random")),
    ("copy/cast", ("copy", "memcpy", "memset", "cast", "fill")),
    ("reduction/sort", ("reduce", "norm_kernel", "sum", "max", "argmax", "cub::", "sort")),
    ("elementwise", ("elementwise", "vectorized", "unrolled", "index", "where", "mul", "add")),
)
KERNELS_LISTED = 40  # the profile's per-kernel list: the slowest in total, with calls per step, to tell which
# part of the model a kind's time comes from (e.g. one dropout kernel per adapted layer and pass)
SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def kernel_kind(name: str) -> str:
    if name in LM_HEAD_KERNELS:
        return "LM head (TRL fused)"
    lowered = name.lower()
    for kind, fragments in KERNEL_KINDS:
        if any(fragment.lower() in lowered for fragment in fragments):
            return kind
    return "other"


def union_length(intervals: list[tuple[float, float]]) -> tuple[float, list[tuple[float, float]]]:
    """Total covered length of possibly overlapping intervals, and the gaps between the merged ones."""
    total, gaps = 0.0, []
    end = None
    for start, stop in sorted(intervals):
        if end is None or start > end:
            if end is not None:
                gaps.append((end, start))
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total, gaps


def phase_at(moment: float, ranges: dict[str, list[tuple[float, float]]]) -> str:
    """The innermost labelled part of a step the CPU was in at `moment` (µs)."""
    def inside(label):
        return any(start <= moment <= stop for start, stop in ranges.get(label, ()))

    if inside(OPTIMIZER):
        return "optimizer step"
    if inside(FORWARD):
        return "forward + loss"
    if inside(TRAINING_STEP):
        return "backward"
    if inside(STEP):
        return "rest of the step (clipping, zero_grad, scheduler, callbacks)"
    return "between steps (data loading, collation, Trainer bookkeeping)"


def summarize_events(events, steps: int) -> dict:
    """Per-step milliseconds from profiler events: wall time, GPU busy/idle, kernel time by kind, idle time by
    the part of the step the CPU was in when the GPU went back to work, and CPU time blocked in syncs."""
    ranges: dict[str, list[tuple[float, float]]] = defaultdict(list)
    kernels, kinds, syncs = [], defaultdict(float), defaultdict(lambda: [0, 0.0])
    names: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    each: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0.0])  # (kernel name, kind) -> [calls, time]
    for event in events:
        start, stop = event.time_range.start, event.time_range.end
        if event.name in (STEP, OPTIMIZER, FORWARD, TRAINING_STEP) and not is_device_event(event):
            ranges[event.name].append((start, stop))
        elif is_device_event(event):
            kernels.append((start, stop))
            kind = kernel_kind(event.name)
            kinds[kind] += stop - start
            names[kind][event.name[:80]] += stop - start
            entry = each[(event.name[:120], kind)]
            entry[0] += 1
            entry[1] += stop - start
        elif event.name.startswith(SYNC_CALLS):
            syncs[event.name.strip()][0] += 1
            syncs[event.name.strip()][1] += stop - start
    if not ranges[STEP]:
        return {}
    window = (min(s for s, _ in ranges[STEP]), max(e for _, e in ranges[STEP]))
    inside = [(max(s, window[0]), min(e, window[1])) for s, e in kernels if e > window[0] and s < window[1]]
    busy, gaps = union_length(inside)
    idle = defaultdict(float)
    for gap_start, gap_end in gaps:
        idle[phase_at(gap_end, ranges)] += gap_end - gap_start
    edge = (window[1] - window[0]) - busy - sum(idle.values())  # before the first / after the last kernel
    if edge > 0:
        idle["between steps (data loading, collation, Trainer bookkeeping)"] += edge
    per_step = 1000.0 * steps
    return {
        "steps": steps,
        "wall_ms": (window[1] - window[0]) / per_step,
        "gpu_busy_ms": busy / per_step,
        "gpu_idle_ms": {k: v / per_step for k, v in sorted(idle.items(), key=lambda kv: -kv[1])},
        "kernel_ms": {k: v / per_step for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])},
        "cpu_phase_ms": {label: sum(e - s for s, e in spans) / per_step for label, spans in ranges.items()},
        "syncs_per_step": {k: {"calls": n / steps, "ms": t / per_step} for k, (n, t) in syncs.items()},
        "top_kernels": {kind: sorted(found, key=lambda n: -found[n])[:3] for kind, found in names.items()},
        "kernels": [{"name": name, "kind": kind, "calls": calls / steps, "ms": time / per_step}
                    for (name, kind), (calls, time) in sorted(each.items(), key=lambda kv: -kv[1][1])[:KERNELS_LISTED]],
    }


def is_device_event(event) -> bool:
    """A kernel, copy or memset on the GPU; not the GPU-side copy the profiler makes of a labelled range."""
    on_device = str(getattr(event, "device_type", "")).endswith(("CUDA", "PrivateUse1"))
    return on_device and not getattr(event, "is_user_annotation", False) and event.time_range.end > 0


class StepProfiler(TrainerCallback):
    """Profiles `steps` optimizer steps starting after `skip` steps; `summary` holds `summarize_events`' result."""

    def __init__(self, skip: int, steps: int = 2, trace: str | None = None):
        self.skip, self.steps, self.trace = skip, steps, trace
        self.profiler = None
        self.labels: list = []
        self.summary: dict = {}

    def _open(self, label):
        from torch.profiler import record_function

        scope = record_function(label)
        scope.__enter__()
        self.labels.append(scope)

    def _close(self):
        if self.labels:
            self.labels.pop().__exit__(None, None, None)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.skip and self.profiler is None:
            import torch
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self.profiler = profile(activities=activities)
            self.profiler.__enter__()
        if self.profiler is not None and not self.summary:
            self._open(STEP)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.profiler is not None and not self.summary:
            self._open(OPTIMIZER)

    def on_optimizer_step(self, args, state, control, **kwargs):
        if self.profiler is not None and not self.summary:
            self._close()

    def on_step_end(self, args, state, control, **kwargs):
        if self.profiler is None or self.summary:
            return
        self._close()
        if state.global_step >= self.skip + self.steps:
            import torch

            if torch.cuda.is_available():
                torch.cuda.synchronize()
            self.profiler.__exit__(None, None, None)
            if self.trace:
                self.profiler.export_chrome_trace(self.trace)
            self.summary = summarize_events(self.profiler.events(), self.steps)
