"""Shared helpers for bench scripts: print a table, write JSON with machine facts."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def print_table(rows: list[dict], cols: list[str] | None = None) -> None:
    if not rows:
        print("(no rows)")
        return
    cols = cols or list(rows[0])
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = [max(len(c), *(len(fmt(r.get(c, ""))) for r in rows)) for c in cols]
    print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(fmt(r.get(c, "")).ljust(w) for c, w in zip(cols, widths, strict=True)))


def write(name: str, payload: dict) -> Path:
    from safety_patch.atomic import write_json

    path = RESULTS / f"{name}.json"
    write_json(path, {"bench": name, "machine": machine(), **payload})
    print(f"\nwrote {path}")
    return path
