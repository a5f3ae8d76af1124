"""Smoke tests on the real embedded model (explicit, marked slow)."""

import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.slow


def test_chat_answers_paris():
    t0 = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "safety_patch.cli", "chat", "--prompt", "What is the capital of France?", "--max-new-tokens", "30"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr
    assert "Paris" in out.stdout, (out.stdout, time.time() - t0)
