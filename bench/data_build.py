"""Wall time of `safety-patch data build` on a fresh cache (self-distillation included), and cached.

The warm build must write the same files as the cold one (sha256 from both manifests): the
generation cache holds greedy answers and the self-written requests' sampling rounds.

Run: .venv/bin/python bench/data_build.py

The model cache is shared (conversion is measured by bench/model_load.py); the generation
cache starts empty for the cold build and is reused by the warm build.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse, print_table, write  # noqa: E402


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args = parse(ap)
    from safety_patch.data.build import read_manifest
    from safety_patch.models import home

    real_home = home()
    with tempfile.TemporaryDirectory() as tmp:
        h = Path(tmp) / "home"
        h.mkdir()
        if (real_home / "models").is_dir():  # reuse the converted model, not the generations
            os.symlink(real_home / "models", h / "models")
        env = dict(os.environ, SAFETY_PATCH_HOME=str(h))
        rows = []
        cold_files = None
        for label in ("cold (distillation runs)", "warm (generation cache)"):
            out = Path(tmp) / "data"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.time()
            subprocess.run([sys.executable, "-m", "safety_patch.cli", "data", "build", "--out", str(out)], env=env,
                           check=True, capture_output=True)
            m = read_manifest(out)
            c = m["counts"]
            cold_files = cold_files or m["files"]
            si = c.get("self_instruct") or {}
            rows.append({"build": label, "seconds": round(time.time() - t0, 1),
                         "train_conversations": c["rows_per_split"]["train"],
                         "test_behaviours": c["behaviours_per_split"]["test"],
                         "general": sum(c["general_per_split"].values()),
                         "borderline": sum(c["borderline_per_split"].values()),
                         "self_instruct": si.get("kept", 0), "self_instruct_s": si.get("seconds"),
                         "files_identical_to_cold": m["files"] == cold_files})
    print_table(rows)
    write("data_build", {"rows": rows}, run=(ap, args))


if __name__ == "__main__":
    main()
