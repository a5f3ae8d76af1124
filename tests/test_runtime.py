import os

import pytest
import torch

from safety_patch import runtime
from safety_patch.errors import SafetyPatchError


def test_auto_on_cpu_is_fp32_with_reason(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = runtime.resolve("auto", "auto")
    assert r.device.type == "cpu" and r.dtype is torch.float32
    assert "no CUDA" in r.reason
    assert "dtype=float32" in r.describe() and "fp32 on CPU" in r.describe()


def test_auto_on_cuda_prefers_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    r = runtime.resolve("auto", "auto")
    assert r.device.type == "cuda" and r.dtype is torch.bfloat16


def test_cuda_without_bf16_falls_back_to_fp16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert runtime.resolve("auto", "auto").dtype is torch.float16


@pytest.mark.parametrize("name,expected", [("bf16", torch.bfloat16), ("float32", torch.float32), ("FP16", torch.float16)])
def test_explicit_dtype(name, expected):
    assert runtime.resolve("cpu", name).dtype is expected


def test_unsupported_dtype_is_one_clear_error():
    with pytest.raises(SafetyPatchError, match="unsupported dtype 'int3'"):
        runtime.resolve("cpu", "int3")


def test_cuda_requested_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SafetyPatchError, match="no CUDA device"):
        runtime.resolve("cuda", "auto")


def test_threads_from_env(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("SAFETY_PATCH_THREADS", "1")
    try:
        assert runtime.configure_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("SAFETY_PATCH_THREADS", "many")
        with pytest.raises(SafetyPatchError, match="SAFETY_PATCH_THREADS"):
            runtime.configure_threads()
    finally:
        torch.set_num_threads(before)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_window_resets_between_runs():
    from safety_patch.runtime import peak_memory_mb, reset_peak_memory

    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    start = peak_memory_mb(cpu)
    big = torch.ones(300 * 2**20 // 4)  # 300 MB, touched
    first = peak_memory_mb(cpu)
    del big
    reset_peak_memory(cpu)
    second = peak_memory_mb(cpu)
    assert first - start > 250 and first - second > 250, (start, first, second)
