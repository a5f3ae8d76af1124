"""Analysis speed and memory: all linear modules of the default model for one LoRA patch, and the
per-module cost on synthetic shapes up to 8B-sized layers (4096 x 14336).

Run: .venv/bin/python bench/analysis_speed.py [--patch DIR]
     .venv/bin/python bench/analysis_speed.py --patches DIR DIR ... [--model SPEC]

With --patches, only the weight analysis of several patches is timed: together (one merged
stream, each W0 decomposed once: ``analysis.run.analyse_weights``, what ``analyze`` and
``reproduce`` run) against one call per patch (each W0 decomposed once per patch, as before
2026-12-02), in the same run, with the rows checked equal; written to analysis_speed_patches.json.

Without --patch a random r=8 LoRA patch on every linear module of the default model is
made (the geometry maths costs the same). Peak memory is the process's max RSS after each
part (the analysis streams one module at a time, so it grows with the largest layer, not the
model).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic(d_out: int, d_in: int, r: int = 8, ks=(8, 32, 128)) -> dict:
    from safety_patch.analysis.weights import Update, analyse_update

    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    u = Update("model.layers.0.mlp.up_proj", (torch.randn(d_out, r, generator=g), torch.randn(r, d_in, generator=g), 2.0), None)
    t = time.time()
    analyse_update(u, W0, list(ks), None, {})
    lora_s = time.time() - t
    dense = Update("model.layers.0.mlp.up_proj", None, torch.randn(d_out, d_in, generator=g) * 1e-3)
    t = time.time()
    analyse_update(dense, W0, list(ks), 8, {})
    return {"shape": f"{d_out}x{d_in}", "lora_s": round(lora_s, 2), "full_delta_s": round(time.time() - t, 2),
            "max_rss_mb": round(rss_mb())}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--patch", default=None)
    ap.add_argument("--patches", nargs="+", default=None, help="time several patches analysed together vs one by one")
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    if args.patches:
        return several(args.patches, args.model, (ap, args))
    from safety_patch.analysis.run import analyze
    from safety_patch.models import load_model
    from safety_patch.testing import make_lora_patch

    with tempfile.TemporaryDirectory() as tmp:
        patch = args.patch
        if patch is None:
            lm = load_model("default")
            patch = make_lora_patch(lm.model, Path(tmp) / "lora", lm.fingerprint, rank=8, scale=0.01)
            del lm
        before = rss_mb()
        t = time.time()
        res = analyze("default", [patch], Path(tmp) / "out", (8, 32, 128))
        model_s = time.time() - t
        n = res["summary"][Path(patch).name]["modules"]
    print(f"default model, one LoRA patch: {n} modules in {model_s:.1f}s (max RSS {rss_mb():.0f} MB, {before:.0f} before)")
    rows = [synthetic(*s) for s in ((576, 1536), (1536, 576), (2048, 8192), (4096, 4096), (4096, 14336), (14336, 4096))]
    print_table(rows)
    write("analysis_speed", {"default_model": {"modules": n, "seconds": round(model_s, 1), "max_rss_mb": round(rss_mb())},
                             "synthetic": rows}, run=(ap, args))


def several(paths: list[str], model: str, run=None) -> None:
    from safety_patch.analysis.run import analyse_weights
    from safety_patch.analysis.weights import checkpoint_reader
    from safety_patch.patches import read_patch
    from safety_patch.runtime import configure_threads

    threads = configure_threads()
    ps = [read_patch(p) for p in paths]
    read_w0, ks = checkpoint_reader(model), [8, 32, 128]
    t = time.time()
    alone = [row for p in ps for row in analyse_weights([p], read_w0, ks)[0]]
    alone_s = time.time() - t
    t = time.time()
    together = analyse_weights(ps, read_w0, ks)[0]
    together_s = time.time() - t
    rows = [{"patches": len(ps), "modules": len(together), "one_by_one_s": round(alone_s, 1),
             "together_s": round(together_s, 1), "speedup": round(alone_s / together_s, 2),
             "rows_identical": together == alone}]
    print_table(rows)
    write("analysis_speed_patches", {"model": model, "threads": threads, "patches": [
        {"path": str(p.path), "id": p.id, "method": p.meta.get("method")} for p in ps], "rows": rows}, run=run, modes=("patches",))


if __name__ == "__main__":
    main()
