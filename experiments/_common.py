"""Shared helpers for selection studies: results JSON with their own arguments and provenance.

Selection studies (recipe and gate sweeps) choose what ships; bench/ holds speed and memory
figures only. Each study writes one ``experiments/results/NAME.json`` that carries the
arguments it ran with, the machine and the project's code identity. Work folders (trained
patches, model cards, snapshots, per-arm caches) go under the git-ignored ``runs/experiments/``.
"""

from __future__ import annotations

import importlib.util
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
