"""The only place that names devices and dtypes, sets thread counts and seeds.

Every stage asks ``resolve(device, dtype)`` once and passes the result down, so the GPU
path (CUDA -> bf16) and the CPU path (fp32) are chosen by construction, with a reason
the CLI prints.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch

from .errors import SafetyPatchError

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    dtype: torch.dtype
    reason: str

    def describe(self) -> str:
        return f"device={self.device} dtype={str(self.dtype).removeprefix('torch.')} ({self.reason})"


def parse_dtype(name: str) -> torch.dtype:
    key = name.strip().lower()
    if key not in DTYPES:
        raise SafetyPatchError(f"unsupported dtype {name!r}; choose one of: auto, float32, bfloat16, float16")
    return DTYPES[key]


def resolve(device: str | None = "auto", dtype: str | None = "auto") -> Runtime:
    """Pick device and dtype: CUDA -> bf16 (fp16 if the GPU lacks bf16), else CPU -> fp32."""
    device = (device or "auto").strip().lower()
    dtype = (dtype or "auto").strip().lower()
    reasons = []
    if device == "auto":
        if torch.cuda.is_available():
            dev = torch.device("cuda")
            reasons.append("CUDA available")
        else:
            dev = torch.device("cpu")
            reasons.append("no CUDA device")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise SafetyPatchError(f"unknown device {device!r}: {e}") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise SafetyPatchError(f"--device {device} asked for, but torch sees no CUDA device")
        reasons.append("--device given")
    if dtype == "auto":
        if dev.type == "cuda":
            dt = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            reasons.append("bf16 on CUDA" if dt is torch.bfloat16 else "GPU lacks bf16: fp16")
        else:
            dt = torch.float32
            reasons.append("fp32 on CPU (bf16 matmuls are slow on most CPUs)")
    else:
        dt = parse_dtype(dtype)
        reasons.append("--dtype given")
    return Runtime(dev, dt, "; ".join(reasons))


def configure_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads from the argument, $SAFETY_PATCH_THREADS, or the core count.

    On a small shared machine the default can be 5-10x slower than one thread when another
    process is busy, so users can set it; we default to the cores this process may use.
    """
    if threads is None:
        env = os.environ.get("SAFETY_PATCH_THREADS")
        if env:
            try:
                threads = int(env)
            except ValueError:
                raise SafetyPatchError(f"SAFETY_PATCH_THREADS must be an integer, got {env!r}") from None
        else:
            threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if threads < 1:
        raise SafetyPatchError(f"thread count must be >= 1, got {threads}")
    # torch tries to start every thread asked for: 100000 ends in MemoryError and a hang, and
    # more threads than cores only slows a CPU run down, so a larger count is a user error.
    cores = max(os.cpu_count() or 1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
    if threads > cores:
        raise SafetyPatchError(f"--threads/SAFETY_PATCH_THREADS {threads} is more than the {cores} cores available")
    torch.set_num_threads(threads)
    return threads


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:  # numpy is optional here
        pass


def reset_peak_memory(device: torch.device) -> None:
    """Start a fresh peak-memory window: CUDA's allocator peak, or on Linux the process's
    peak resident set (writing 5 to /proc/self/clear_refs resets VmHWM to the current RSS),
    so several runs in one process each report their own peak, not the largest so far."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux, or not allowed: peak_memory_mb falls back to the lifetime peak
        pass


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory since ``reset_peak_memory``: CUDA allocator peak, else the process's peak
    resident set (VmHWM; the lifetime maximum RSS where /proc is missing)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    except ImportError:
        return float("nan")
