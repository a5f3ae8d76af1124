"""The process's memory allocator (allocator.py): glibc's mmap threshold pinned, mimalloc by
re-execution, and the choice's validation."""

import os
import platform
import subprocess
import sys

import pytest

from safety_patch import allocator
from safety_patch.errors import SafetyPatchError

GLIBC = os.path.exists("/proc/self/status") and platform.libc_ver()[0] == "glibc"


# A child process frees 8 MiB tensors allocated between long-lived small ones, after one
# 24 MiB free has raised glibc's dynamic mmap threshold above 8 MiB: the heap pattern of a
# training step. It prints how much resident memory the frees returned.
_HEAP_CHILD = """
import sys, torch
from safety_patch import allocator
if sys.argv[1] == "pinned":
    assert allocator.fix_mmap_threshold()
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
first = torch.ones(6 * 2**20)  # one 24 MiB tensor, freed
del first
big, small = [], []
for _ in range(64):
    big.append(torch.ones(2 * 2**20))  # 8 MiB
    small.append(torch.ones(50_000))   # 200 KB, stays alive between the big ones
before = rss()
big.clear()
print(before - rss())
"""


def _child_env(**kw) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", allocator._REEXECUTED, allocator.ENV)}
    return env | kw


@pytest.mark.skipif(not GLIBC, reason="glibc on Linux only")
def test_a_pinned_mmap_threshold_returns_freed_tensors_to_the_os():
    def returned(mode: str) -> float:
        out = subprocess.run([sys.executable, "-c", _HEAP_CHILD, mode], capture_output=True, text=True, check=True,
                             env=_child_env())
        return float(out.stdout.strip().splitlines()[-1])

    # 64 x 8 MiB = 512 MiB freed: pinned, nearly all of it leaves the process at once; with
    # glibc's dynamic threshold the heap keeps it (the cause of the training step's 2x RSS)
    assert returned("pinned") > 400
    assert returned("dynamic") < 100


# The child re-executes itself under mimalloc when asked, then reports what allocates its memory.
_REEXEC_CHILD = """
from safety_patch import allocator
allocator.reexec_under_mimalloc()
print(allocator.loaded_mimalloc(), allocator.configure())
"""


def _run_child(**env) -> str:
    out = subprocess.run([sys.executable, "-c", _REEXEC_CHILD], capture_output=True, text=True, env=_child_env(**env))
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(allocator.mimalloc_library() is None, reason="mimalloc (cmeel-mimalloc) is not installed here")
def test_the_command_reexecutes_itself_once_under_mimalloc():
    # default (auto) and an explicit ask both end in a process that has mimalloc mapped, and
    # the allocator it records names it; the marker stops a second re-execution
    assert _run_child().startswith("True mimalloc ")
    assert _run_child(SAFETY_PATCH_ALLOCATOR="mimalloc").startswith("True mimalloc ")


@pytest.mark.skipif(not GLIBC, reason="glibc on Linux only")
def test_system_leaves_malloc_as_it_comes_and_auto_without_mimalloc_pins_glibc(monkeypatch):
    assert _run_child(SAFETY_PATCH_ALLOCATOR="system") == "False system malloc"
    # auto where mimalloc is not installed: no re-execution, glibc's threshold pinned
    monkeypatch.setattr(allocator, "mimalloc_library", lambda: None)
    monkeypatch.setattr(allocator, "loaded_mimalloc", lambda: False)
    monkeypatch.setattr(allocator.os, "execve", lambda *a: pytest.fail("re-executed without mimalloc"))
    monkeypatch.setenv(allocator.ENV, "auto")
    monkeypatch.delenv(allocator._REEXECUTED, raising=False)
    allocator.reexec_under_mimalloc()


def test_asking_for_mimalloc_where_it_is_missing_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(allocator, "mimalloc_library", lambda: None)
    monkeypatch.setattr(allocator, "loaded_mimalloc", lambda: False)
    monkeypatch.delenv(allocator._REEXECUTED, raising=False)
    monkeypatch.setenv(allocator.ENV, "mimalloc")
    with pytest.raises(SafetyPatchError, match="mimalloc is not installed"):
        allocator.reexec_under_mimalloc()


@pytest.mark.parametrize("value", ["jemalloc", "yes", "1"])
def test_an_unknown_allocator_choice_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(allocator.ENV, value)
    with pytest.raises(SafetyPatchError, match="SAFETY_PATCH_ALLOCATOR must be one of auto, mimalloc, system"):
        allocator.choice()


def test_the_console_script_refuses_a_bad_choice_before_loading_anything(tmp_path):
    # the entry point answers in one line and exit code 2, without a traceback
    out = subprocess.run([sys.executable, "-m", "safety_patch.entry", "--help"], capture_output=True, text=True,
                         env=_child_env(SAFETY_PATCH_ALLOCATOR="bogus"))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "safety-patch: error: SAFETY_PATCH_ALLOCATOR must be one of auto, mimalloc, system; got 'bogus'"]


def test_asking_for_mimalloc_when_the_loader_did_not_preload_it_is_an_error(monkeypatch):
    # the re-executed process (marker set) without mimalloc mapped: asked for, not given
    monkeypatch.setattr(allocator, "loaded_mimalloc", lambda: False)
    monkeypatch.setenv(allocator._REEXECUTED, "1")
    monkeypatch.setenv(allocator.ENV, "mimalloc")
    with pytest.raises(SafetyPatchError, match="could not preload it"):
        allocator.reexec_under_mimalloc()
    monkeypatch.setenv(allocator.ENV, "auto")  # auto accepts what it got
    allocator.reexec_under_mimalloc()
