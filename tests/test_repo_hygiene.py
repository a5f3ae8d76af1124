"""The committed tree holds no absolute path of the machine that made it (results, logs, docs, code)."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# A path under a machine's home, work or temp folders: "/tmp/x", "/work/main/...", "/root/...", "/home/u/...".
MACHINE_PATH = re.compile(r"(?<![A-Za-z0-9_.~<>-])/(?:tmp|work|root|home|Users)/[A-Za-z0-9_.-]")


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / p for p in out.decode().split("\0") if p]


def test_no_absolute_machine_paths_committed():
    offenders = []
    for f in _tracked_files():
        if f == Path(__file__).resolve() or not f.is_file() or f.stat().st_size > 5_000_000:  # its own examples
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary
        for n, line in enumerate(text.splitlines(), 1):
            if MACHINE_PATH.search(line):
                offenders.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not offenders, "absolute machine paths committed:\n" + "\n".join(offenders[:20])


def test_the_check_can_fail():
    assert MACHINE_PATH.search('"data": "/tmp/dgx"') and MACHINE_PATH.search("see /work/main/bench")
    assert not MACHINE_PATH.search('"data": "<local>/dgx"') and not MACHINE_PATH.search("runs/experiments/x")
