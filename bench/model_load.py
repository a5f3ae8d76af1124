"""Load time of the default model: first (GGUF -> safetensors conversion) and later loads.

Run: .venv/bin/python bench/model_load.py

Each load runs in a fresh process (as a user's command would), with a fresh
SAFETY_PATCH_HOME for the cold load and the same one for the warm loads.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse, print_table, write  # noqa: E402

CODE = (
    "import time; t=time.time(); from safety_patch.models import load_model; lm=load_model('default'); "
    "print(round(time.time()-t, 2), lm.fingerprint)"
)


def one(home: str) -> dict:
    t0 = time.time()
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, check=True,
                         env={"SAFETY_PATCH_HOME": home, "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"})
    load_s, fp = out.stdout.split()
    return {"load_s": float(load_s), "process_s": round(time.time() - t0, 2), "fingerprint": fp[:12]}


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args = parse(ap)
    with tempfile.TemporaryDirectory() as home:
        rows = [dict(load="first (converts GGUF)", **one(home))]
        for i in range(3):
            rows.append(dict(load=f"later #{i + 1}", **one(home)))
    print_table(rows)
    assert len({r["fingerprint"] for r in rows}) == 1, "fingerprint changed between loads"
    write("model_load", {"rows": rows, "second_load_s": rows[1]["load_s"], "second_load_process_s": rows[1]["process_s"]}, run=(ap, args))


if __name__ == "__main__":
    main()
