"""Shared helpers for bench scripts: print a table, write JSON with machine facts."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import signal
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CUSTOM = RESULTS / "custom"
"""Where a run with arguments other than the defaults writes (git-ignored), unless it names its
output: a best-of-1 or a different patch must not silently replace a recorded result."""
OUTPUT_NAMES = ("name", "out", "out_name", "results")
"""Options by which a script names its results file: naming one is asking to write there."""
PLACES = ("data", "work", "keep")
"""Options that say where inputs or scratch files are (``make bench`` passes ``--data``), not
how the measurement is made: they are recorded with the arguments but never divert a result."""


def _terminated(signum, _frame):  # `timeout`, `kill`: unwind, so temporary folders are removed
    raise SystemExit(128 + signum)


signal.signal(signal.SIGTERM, _terminated)


def machine() -> dict:
    import torch

    env = os.environ.get("SAFETY_PATCH_THREADS")
    # the library (and every child process a bench starts) takes its thread count from the
    # environment; torch's count in this process is only what this process was left with
    return {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "threads": int(env) if env and env.isdigit() else torch.get_num_threads(),
            "threads_from": "SAFETY_PATCH_THREADS" if env and env.isdigit() else "torch",
            "cuda": torch.cuda.is_available(),
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


def parse(ap: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``ap.parse_args(argv)``; every script parses through here, so ``--help`` only prints help."""
    return ap.parse_args(argv)


def changed(ap: argparse.ArgumentParser, args: argparse.Namespace, modes: tuple[str, ...] = ()) -> dict:
    """The arguments of this run that differ from the script's defaults, leaving out required
    ones, the results file's own name, :data:`PLACES` and ``modes`` (options that choose the
    results name, such as ``--tiny``)."""
    skip = {a.dest for a in ap._actions if a.required} | set(OUTPUT_NAMES) | set(PLACES) | set(modes)
    return {k: v for k, v in vars(args).items() if k not in skip and v != ap.get_default(k)}


def write(name: str, payload: dict, run: tuple[argparse.ArgumentParser, argparse.Namespace] | None = None,
          modes: tuple[str, ...] = ()) -> Path:
    """Write ``bench/results/NAME.json`` with the machine's facts and, given ``run`` (the parser and
    this run's arguments), the arguments. A run whose arguments differ from the defaults
    (:func:`changed`) and that does not name its results file writes under
    ``bench/results/custom/`` instead (named by a hash of those arguments), so a recorded result
    is replaced only by a run like the one that recorded it, or by one that names its output."""
    from safety_patch.atomic import write_json

    path = RESULTS / f"{name}.json"
    extra = {}
    if run is not None:
        ap, args = run
        extra["args"] = {k: v if isinstance(v, (int, float, str, bool, type(None), list)) else str(v)
                         for k, v in vars(args).items()}
        diff = changed(ap, args, modes)
        named = any(k in OUTPUT_NAMES and v != ap.get_default(k) for k, v in vars(args).items())
        if diff and not named:
            tag = hashlib.sha256(json.dumps(diff, sort_keys=True, default=str).encode()).hexdigest()[:8]
            path = CUSTOM / f"{name}-{tag}.json"
            flags = ", ".join("--" + k.replace("_", "-") for k in diff)
            print(f"\nnon-default arguments ({flags}): the recorded {RESULTS / (name + '.json')} is kept "
                  "(name the results file to replace it)", file=sys.stderr)
    write_json(path, {"bench": name, "machine": machine(), **extra, **payload})
    print(f"\nwrote {path}")
    return path
