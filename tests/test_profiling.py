"""The profile summary: kernel time by kind, GPU idle time by the part of the step the CPU was in, syncs."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from toolkit.bench import profiling


def event(name, start, end, device="CPU", annotation=False):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(start=start, end=end),
                           device_type=f"DeviceType.{device}", is_user_annotation=annotation)


def test_kernel_kinds():
    assert profiling.kernel_kind("nvjet_sm90_tst_256x128_64x4_1x2_h_bz_coopA_NNT") == "matmul"
    assert profiling.kernel_kind("_forward_kernel") == "LM head (TRL fused)"
    assert profiling.kernel_kind("_swiglu_backward_kernel") == "norm/rope/swiglu (Liger)"
    assert profiling.kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop") == "attention"
    assert profiling.kernel_kind("something new") == "other"


def test_idle_gaps_are_charged_to_the_phase_the_cpu_was_in():
    events = [
        event(profiling.STEP, 0, 100),
        event(profiling.TRAINING_STEP, 5, 80),
        event(profiling.FORWARD, 5, 40),
        event(profiling.OPTIMIZER, 85, 95),
        event("nvjet_gemm", 10, 30, "CUDA"),  # forward
        event("nvjet_gemm", 35, 38, "CUDA"),  # 5 idle, ends in forward
        event("vectorized_elementwise_kernel", 50, 75, "CUDA"),  # 12 idle, ends in backward
        event("multi_tensor_apply_kernel", 88, 92, "CUDA"),  # 13 idle, ends in the optimizer step
        event(profiling.STEP, 0, 100, "CUDA", annotation=True),  # the profiler's GPU copy of a label: not work
        event("cudaStreamSynchronize", 38, 45),
    ]
    summary = profiling.summarize_events(events, steps=1)
    assert summary["wall_ms"] == pytest.approx(0.1) and summary["gpu_busy_ms"] == pytest.approx(0.052)
    assert summary["gpu_idle_ms"]["forward + loss"] == pytest.approx(0.005)
    assert summary["gpu_idle_ms"]["backward"] == pytest.approx(0.012)
    assert summary["gpu_idle_ms"]["optimizer step"] == pytest.approx(0.013)
    assert summary["gpu_idle_ms"]["between steps (data loading, collation, Trainer bookkeeping)"] == \
        pytest.approx(0.018)  # before the first kernel and after the last
    assert summary["kernel_ms"] == pytest.approx({"matmul": 0.023, "elementwise": 0.025, "optimizer": 0.004})
    assert summary["syncs_per_step"]["cudaStreamSynchronize"] == {"calls": 1, "ms": pytest.approx(0.007)}
    assert summary["kernels"] == [
        {"name": "vectorized_elementwise_kernel", "kind": "elementwise", "calls": 1, "ms": pytest.approx(0.025)},
        {"name": "nvjet_gemm", "kind": "matmul", "calls": 2, "ms": pytest.approx(0.023)},
        {"name": "multi_tensor_apply_kernel", "kind": "optimizer", "calls": 1, "ms": pytest.approx(0.004)}]


def test_no_labelled_step_no_summary():
    assert profiling.summarize_events([event("nvjet_gemm", 0, 1, "CUDA")], steps=1) == {}
