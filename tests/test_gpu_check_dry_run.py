"""scripts/gpu_check.py's CPU dry run (``--cpu``): the script a GPU session runs first must run end
to end here, or a lent device's minutes go to a broken script (it had drifted from the data
folder's schema unnoticed until session 20)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.py"


def test_gpu_check_runs_on_the_cpu(tmp_path):
    (scratch := tmp_path / "tmpdir").mkdir()
    env = dict(os.environ, SAFETY_PATCH_HOME=str(tmp_path / "home"), TMPDIR=str(scratch))
    r = subprocess.run([sys.executable, str(SCRIPT), "--cpu"], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    # its ~20 MB of folders went with it (they were left in /tmp each run); torch's own compile cache may stay
    assert [p.name for p in scratch.iterdir() if not p.name.startswith("torchinductor_")] == []
    out = json.loads(r.stdout[r.stdout.rindex("\n{\n") + 1:])  # the final report (json, indented)
    assert out["gpu"] == "none (--cpu)" and out["detach_max_abs_diff"] == 0.0
    g = out["gated"]
    assert g["routing_matches"] is True and g["scoring_max_abs_diff"] < 1e-3
    assert any(g["fires"]) and not all(g["fires"])  # the routing check compared both routes
