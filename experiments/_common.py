"""Shared helpers for selection studies: results JSON with their own arguments and provenance.

Selection studies (recipe and gate sweeps) choose what ships; bench/ holds speed and memory
figures only. Each study writes one ``experiments/results/NAME.json`` that carries the
arguments it ran with, the machine and the project's code identity. Work folders (trained
patches, model cards, snapshots, per-arm caches) go under the git-ignored ``runs/experiments/``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
WORK = ROOT / "runs" / "experiments"

# One table printer and machine record for bench/ and experiments/: bench's module, loaded by
# path (both folders name their helper `_common`).
_spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench" / "_common.py")
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)
machine, print_table = _bench.machine, _bench.print_table


def write(name: str, payload: dict, args=None) -> Path:
    """Write ``RESULTS/NAME.json``: the payload plus ``args`` (an argparse namespace or dict), machine, provenance."""
    from safety_patch.atomic import write_json
    from safety_patch.provenance import provenance

    arguments = vars(args) if args is not None and not isinstance(args, dict) else (args or {})
    path = RESULTS / f"{name}.json"
    write_json(path, {"study": name, "args": arguments, "machine": machine(), **provenance(), **payload})
    print(f"\nwrote {path}")
    return path


def add_gcg_budget(ap) -> None:
    """The GCG budget flags the attack studies share (adaptive_attack.py, gate_adversarial.py):
    --steps, --width (search width), --topk, --suffix-tokens; session 16's budget by default."""
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--suffix-tokens", type=int, default=20)


def gcg_budget(args, **extra):
    """attacks.gcg.GCGSettings from :func:`add_gcg_budget`'s flags (``extra``: further fields)."""
    from safety_patch.attacks.gcg import GCGSettings

    return GCGSettings(steps=args.steps, search_width=args.width, topk=args.topk, suffix_tokens=args.suffix_tokens,
                       **extra)


def gated_pair(gated_path: str, always_on_path: str):
    """(gated, always_on) patches read; exits unless the first carries a gate and the second does not."""
    from safety_patch.patches import read_patch

    gated, always_on = read_patch(gated_path), read_patch(always_on_path)
    if not gated.gated or always_on.gated:
        sys.exit(f"--gated must carry a gate and --always-on must not ({gated_path}, {always_on_path})")
    return gated, always_on
