"""The training finite guard's cost per optimiser step: the exact per-tensor scan vs the fused norm.

Run: .venv/bin/python bench/finite_guard.py [--model default] [--repeats 5]

`train` checks every trainable gradient before each optimiser step and every trainable weight
after it (train/callbacks.py::_finite_guard: a NaN adapter turns every answer empty, which a safety
evaluation would score as perfect). For a full-parameter run on the embedded model that is
2 x 134.5M values per step. Arms, on the model's own parameters with random gradients, in one
process and alternating:

* ``isfinite per tensor``: ``torch.isfinite(t).all()`` per tensor (the guard before session 19);
* ``fused norm``: ``train.callbacks._nonfinite``: one ``torch.nn.utils.get_total_norm`` over all of
  them, the exact scan only when that is not finite.

Both must agree (finite here). Prints a table, writes bench/results/finite_guard.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write  # noqa: E402


def per_tensor(named) -> str | None:
    tensors = [(n, t.detach()) for n, t in named if t is not None]
    ok = torch.stack([torch.isfinite(t).all() for _, t in tensors])
    return None if bool(ok.all()) else tensors[int((~ok).nonzero()[0, 0])][0]


def main() -> None:
    from safety_patch import runtime as rt
    from safety_patch.models import load_model
    from safety_patch.train.callbacks import _nonfinite

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    threads = rt.configure_threads()
    model = load_model(args.model, device="cpu").model
    torch.manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    n = sum(p.numel() for p in model.parameters())
    times: dict[str, list[float]] = {"isfinite per tensor": [], "fused norm": []}
    for _ in range(args.repeats):
        for name, f in (("isfinite per tensor", per_tensor), ("fused norm", _nonfinite)):
            t = time.perf_counter()
            assert f((k, p.grad) for k, p in model.named_parameters()) is None
            assert f(model.named_parameters()) is None
            times[name].append(time.perf_counter() - t)
    base = min(times["isfinite per tensor"])
    rows = [{"guard": k, "best s per step (grads + weights)": round(min(v), 4), "speed-up": round(base / min(v), 2)}
            for k, v in times.items()]
    print_table(rows)
    write("finite_guard", {"rows": rows, "times": times, "parameters": n, "repeats": args.repeats, "threads": threads}, run=(ap, args))


if __name__ == "__main__":
    main()
