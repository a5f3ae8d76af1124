"""The base fingerprint's speed: the hash in pieces (``fingerprint.hash_tensors``) against the
way it was computed before (each tensor cast to fp32 on the host, copied out with ``tobytes``,
then hashed), on the same weights in the same run, with the floor of any implementation of this
definition (one sha256 stream over 4 bytes a parameter at this machine's measured rate).

Run: .venv/bin/python bench/fingerprint_speed.py [--model default] [--dtypes float32,bfloat16] [--repeats 3]

On a GPU the pieces also hide the device-to-host copy behind the hash (bench/scale.py measures
that inside the first load of 1B and 8B models). The two paths must give the same digest; the
script stops if they do not.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse, print_table, write  # noqa: E402


def reference(named) -> str:
    """The fingerprint's tensor hash as computed until 2026-12-04 (the baseline)."""
    h = hashlib.sha256()
    seen = set()
    for name, t in named:
        key = (t.data_ptr(), tuple(t.shape), tuple(t.stride()))
        if key in seen:
            continue
        seen.add(key)
        h.update(name.encode())
        h.update(json.dumps(list(t.shape)).encode())
        h.update(t.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


def main(argv: list[str] | None = None) -> dict:
    import argparse

    from safety_patch.fingerprint import hash_tensors
    from safety_patch.models import load_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved runs of each path; the fastest is kept")
    ap.add_argument("--device", default="cpu")
    args = parse(ap, argv)
    buf = os.urandom(256 << 20)
    t = time.perf_counter()
    hashlib.sha256(buf).digest()
    sha_gbs = (256 << 20) / (time.perf_counter() - t) / 1e9
    del buf
    rows = []
    for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
        lm = load_model(args.model, device=args.device, dtype=dtype)
        named = list(lm.model.state_dict().items())
        n = sum(p.numel() for p in lm.model.parameters())
        best = {"reference": float("inf"), "pieces": float("inf")}
        digests = {}
        for _ in range(args.repeats):
            for arm, fn in (("reference", reference), ("pieces", hash_tensors)):
                t = time.perf_counter()
                digests[arm] = fn(named)
                best[arm] = min(best[arm], time.perf_counter() - t)
        if digests["reference"] != digests["pieces"]:
            raise SystemExit(f"the two paths disagree on {args.model} in {dtype}: {digests}")
        rows.append({"dtype": dtype, "params_m": round(n / 1e6, 1), "reference_s": round(best["reference"], 3),
                     "pieces_s": round(best["pieces"], 3), "ratio": round(best["reference"] / best["pieces"], 2),
                     "floor_s": round(4 * n / (sha_gbs * 1e9), 3), "digest": digests["pieces"][:12]})
        del lm
    print_table(rows)
    payload = {"rows": rows, "sha256_gbs": round(sha_gbs, 3)}
    write("fingerprint_speed", payload, run=(ap, args))
    return payload


if __name__ == "__main__":
    main()
