"""The process's memory allocator for CPU tensors: mimalloc where installed (Linux), else glibc
with its mmap threshold pinned.

Why: torch allocates CPU tensors with the C library's ``posix_memalign``. glibc raises its mmap
threshold after each large free (dynamically, up to 32 MiB), after which activation-sized
tensors (9-25 MB on the embedded model) come from the heap, and the heap keeps what it
fragments. Measured on the embedded model (bench/train_throughput.py, the default recipe's LoRA
on 32 of its conversations, 4 steps of 8, sequences up to 512 tokens, 2 threads, one run,
2026-12-02; the trained adapter bit-identical in every arm):

======================================  ========  ========
arm                                     tokens/s  peak RSS
======================================  ========  ========
glibc as it comes (the trainer before)      47.2   10.5 GB
mimalloc                                    34.6    6.8 GB
glibc, threshold pinned, recomputation      24.3    1.6 GB
mimalloc, recomputation (sessions 17-27)    38.0    1.7 GB
plain TRL + PEFT, fp32                      24.6    8.3 GB
======================================  ========  ========

Pinning the threshold returns every large tensor to the OS when freed, but each allocation then
pays fresh page faults (a VM's page faults are dear). mimalloc (https://github.com/microsoft/mimalloc,
MIT; PyPI ``cmeel-mimalloc``) reuses freed memory without that fragmentation: with
recomputation, the pinned threshold's resident memory at 1.56x its speed (0.80x the trainer
before, which held six times the memory; 0.69x over the default's whole 74 steps). Since session 28 a CPU run passes each batch one row at a time without recomputation
(train/config.py ``micro_batch_size``): 1.8 GB under mimalloc, 1.05-2.8x recomputation's speed
(the default's whole set; 32 rows with long ones). A C allocator can only be swapped
before the process starts, so the ``safety-patch`` command re-executes itself once with
mimalloc in ``LD_PRELOAD`` (``reexec_under_mimalloc``), before torch is imported.

``$SAFETY_PATCH_ALLOCATOR``: ``auto`` (default: mimalloc if installed, else glibc pinned),
``mimalloc`` (an error if it is not installed), or ``system`` (leave the C library's malloc
exactly as it is). The allocator does not change any number a run computes, only its memory
and time; it is recorded with the library versions (provenance.library_versions).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .errors import SafetyPatchError

ENV = "SAFETY_PATCH_ALLOCATOR"
CHOICES = ("auto", "mimalloc", "system")
# Set in the re-executed process so that it never re-executes again.
_REEXECUTED = "SAFETY_PATCH_ALLOCATOR_REEXEC"
# glibc's mallopt parameter number for the mmap threshold (malloc.h: M_MMAP_THRESHOLD = -3).
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024  # glibc's initial value, kept fixed
_PINNED: dict[str, int] = {}  # the threshold this process pinned, if it did


def choice() -> str:
    """``$SAFETY_PATCH_ALLOCATOR`` (default ``auto``). Raises SafetyPatchError for any other value."""
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise SafetyPatchError(f"{ENV} must be one of {', '.join(CHOICES)}; got {os.environ.get(ENV)!r}")
    return value


def mimalloc_library() -> Path | None:
    """Path of the installed ``libmimalloc.so`` (PyPI ``cmeel-mimalloc``), or None where it is not
    installed or the platform is not Linux (LD_PRELOAD is how it is loaded)."""
    if not sys.platform.startswith("linux"):
        return None
    from importlib import metadata

    try:
        files = metadata.files("cmeel-mimalloc") or []
    except metadata.PackageNotFoundError:
        return None
    libs = sorted((Path(str(f.locate())) for f in files if f.name.startswith("libmimalloc.so")), key=lambda p: len(p.name))
    return next((p.resolve() for p in libs if p.exists()), None)


def loaded_mimalloc() -> bool:
    """True if mimalloc is mapped into this process (Linux: /proc/self/maps)."""
    try:
        return "libmimalloc" in Path("/proc/self/maps").read_text()
    except OSError:
        return False


def reexec_under_mimalloc() -> None:
    """Replace this process with the same command under mimalloc (``LD_PRELOAD``), once.

    Call it first thing in a command-line entry point, before torch is imported. Returns without
    doing anything when mimalloc is already loaded, when ``$SAFETY_PATCH_ALLOCATOR`` is
    ``system``, when this process is already the re-executed one, or (``auto``) when mimalloc is
    not installed. Raises SafetyPatchError when ``mimalloc`` was asked for and is not installed,
    or the re-executed process could not preload it.
    If the exec itself fails (OSError), the command goes on in this process unchanged.
    """
    wanted = choice()
    if wanted == "mimalloc" and os.environ.get(_REEXECUTED) and not loaded_mimalloc():
        # re-executed, yet the loader did not preload it (it says why on stderr): asked for, not given
        raise SafetyPatchError(f"{ENV}=mimalloc, but the re-executed process could not preload it (LD_PRELOAD)")
    if wanted == "system" or os.environ.get(_REEXECUTED) or loaded_mimalloc():
        return
    lib = mimalloc_library()
    if lib is None:
        if wanted == "mimalloc":
            raise SafetyPatchError(f"{ENV}=mimalloc, but mimalloc is not installed (pip install cmeel-mimalloc; Linux only)")
        return
    preload = " ".join(x for x in (str(lib), os.environ.get("LD_PRELOAD", "")) if x)
    env = {**os.environ, "LD_PRELOAD": preload, _REEXECUTED: "1"}
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    try:
        os.execve(sys.executable, list(sys.orig_argv), env)
    except OSError:
        return


def fix_mmap_threshold(threshold: int = MMAP_THRESHOLD) -> bool:
    """Pin glibc malloc's mmap threshold at ``threshold`` bytes, so that every allocation at least
    that large is its own mmap, unmapped when freed (and glibc's dynamic adjustment is off,
    mallopt(3)). Returns True if set; False where the C library is not glibc's malloc
    (mimalloc preloaded, macOS, musl, Windows), which is left as it is. Process-wide."""
    import ctypes
    import ctypes.util
    import platform

    if platform.libc_ver()[0] != "glibc" or loaded_mimalloc():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        done = bool(libc.mallopt(_M_MMAP_THRESHOLD, int(threshold)))
    except (OSError, AttributeError):
        return False
    if done:
        _PINNED["threshold"] = int(threshold)
    return done


def configure() -> str:
    """Settle this process's allocator as the CLI runs it (after ``reexec_under_mimalloc``):
    glibc's mmap threshold is pinned unless mimalloc is loaded or ``system`` was asked for.
    Returns what is in use (``describe``)."""
    if choice() != "system" and not loaded_mimalloc():
        fix_mmap_threshold()
    return describe()


def describe() -> str:
    """What allocates this process's memory: ``mimalloc 3.4.3``, ``glibc malloc, mmap threshold
    pinned at 131072 bytes``, or ``system malloc`` (left as it came)."""
    if loaded_mimalloc():
        from importlib import metadata

        try:
            return f"mimalloc {metadata.version('cmeel-mimalloc')}"
        except metadata.PackageNotFoundError:
            return "mimalloc"
    if "threshold" in _PINNED:
        return f"glibc malloc, mmap threshold pinned at {_PINNED['threshold']} bytes"
    return "system malloc"
