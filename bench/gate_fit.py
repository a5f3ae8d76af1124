"""Gate fit speed: feature extraction on the old path and on the default shared-prefix path.

Run: .venv/bin/python bench/gate_fit.py --data DIR [--model default] [--sample 0] [--budgets 4096] [--repeats 1]

The gate's cost is one forward pass per prompt, stopped after the gate's layer, read at the
last prompt token (gate.layer_states); the probe fit itself (LBFGS on [n, hidden]) takes
seconds. This times, in one process and on the same prompts:

* ``old``: ``gate.prompt_states`` with batch 8 (what ``train`` ran before the gate stage),
* ``batch 8 (before session 18)``: ``gate.features.features(batching=None)``: the same batches under
  inference mode (the default of ``train`` and ``gate fit`` until 2026-12-02),
* ``shared-prefix``: ``gate.features.features(batching="shared-prefix")``, the default: each beginning
  many prompts share read once through a prefix tree (``shared_prefix.py``),
* ``one row (batch 1)``: ``features(batching=None, batch_size=1)``, a pass per prompt: no
  padding, no attention mask (training's passes of one row, session 28),
* ``bucketed-B`` (``--budgets``): length-bucketed batches of at most B tokens, up to 64 rows,
* the default path through the stage's feature cache, cold and warm (``gate.features.cached_features``:
  a refit with another threshold, target FPR or L2, or ``gate fit`` after ``train``).

``--sample 0`` (the default) times the whole pool: the train pool plus the validation pool, what
a fit reads. ``--sample N`` times every k-th prompt of the length-sorted pool and projects the
pool's seconds from tokens/s; a sample thins out the shared beginnings, so the shared-prefix
path's projection there is pessimistic (the table gives the tree's token reads for both). Prints
a table and writes bench/results/gate_fit.json with each path's ratio to ``old`` measured in this
run, the tree's token reads, the machine's load and thread count.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="default")
    ap.add_argument("--sample", type=int, default=0, help="prompts to time (0 = the whole pool)")
    ap.add_argument("--budgets", default="", help="comma-separated token budgets for bucketed paths")
    ap.add_argument("--no-cache-rows", action="store_true", help="skip the feature-cache cold/warm rows")
    ap.add_argument("--self-instruct", type=int, default=None,
                    help="gate.self_instruct (default: the gate's default; needs data build --self-instruct)")
    ap.add_argument("--repeats", type=int, default=1, help="interleaved rounds; each path's best time counts")
    ap.add_argument("--name", default="gate_fit")
    args = ap.parse_args()

    import torch

    from safety_patch.gate.config import SHARED_PREFIX, GateFitConfig
    from safety_patch.gate.features import encode, features
    from safety_patch.gate.pool import gate_prompts, held_out_prompts
    from safety_patch.gate.probe import decoder_layers, prompt_states
    from safety_patch.models import load_model
    from safety_patch.runtime import configure_threads
    from safety_patch.shared_prefix import plan, plan_cost

    configure_threads()
    lm = load_model(args.model, device="cpu")
    lm.model.eval()
    cfg = GateFitConfig() if args.self_instruct is None else GateFitConfig(self_instruct=args.self_instruct)
    layer = cfg.resolved_layer(len(decoder_layers(lm.model)))
    t0 = time.time()
    harmful, benign, counts = gate_prompts(args.data, cfg)
    val = held_out_prompts(args.data, "val", cfg.seed)
    pool = encode(lm.tokenizer, harmful + benign + [m for v in val.values() for m in v])
    prep_s = time.time() - t0
    order = sorted(range(len(pool)), key=lambda i: len(pool[i]))
    if args.sample and args.sample < len(pool):
        step = len(pool) / args.sample
        chosen = [order[int(i * step)] for i in range(args.sample)]
    else:
        chosen = order
    prompts = [pool[i] for i in chosen]
    tokens = sum(len(p) for p in prompts)
    pool_tokens = sum(len(p) for p in pool)
    load = os.getloadavg()
    tree = {"timed": plan_cost(plan(prompts), prompts), "pool": plan_cost(plan(pool), pool)}

    def timed(fn):
        t = time.perf_counter()
        x = fn()
        return x, time.perf_counter() - t

    paths = {"old (batch 8)": lambda: prompt_states(lm.model, lm.tokenizer, prompts, layer, 8),
             "batch 8 (before session 18)": lambda: features(lm.model, lm.tokenizer, prompts, layer, batching=None),
             "shared-prefix": lambda: features(lm.model, lm.tokenizer, prompts, layer, batching=SHARED_PREFIX),
             # no padding and no attention mask: the lever that sped training up (session 28)
             "one row (batch 1)": lambda: features(lm.model, lm.tokenizer, prompts, layer, batching=None, batch_size=1)}
    for b in (int(v) for v in args.budgets.split(",") if v):
        paths[f"bucketed-{b}"] = lambda b=b: features(lm.model, lm.tokenizer, prompts, layer, batching=b)
    features(lm.model, lm.tokenizer, prompts[:: 20], layer)  # warm-up (allocator, kernels)
    best: dict[str, float] = {}
    out: dict[str, torch.Tensor] = {}
    for _ in range(args.repeats):  # interleaved, best of N: a shared machine's load hits every path alike
        for name, fn in paths.items():
            out[name], s = timed(fn)
            best[name] = min(best.get(name, s), s)
    ref, old_s = out["old (batch 8)"], best["old (batch 8)"]
    rows = [{"path": name, "seconds": best[name], "max_abs_diff": float((out[name] - ref).abs().max()),
             "bit_identical": torch.equal(out[name], ref)} for name in paths]
    # Reuse across settings: the stage's feature cache, cold (computes and stores) then warm (a refit
    # with another threshold / target FPR / L2 reads the same features back).
    import tempfile

    from safety_patch.gate.features import cached_features

    if not args.no_cache_rows:
        with tempfile.TemporaryDirectory() as home:
            os.environ["SAFETY_PATCH_HOME"] = home
            x, cold = timed(lambda: cached_features(lm.model, lm.tokenizer, prompts, layer, fingerprint=lm.fingerprint))
            y, warm = timed(lambda: cached_features(lm.model, lm.tokenizer, prompts, layer, fingerprint=lm.fingerprint))
        for name, s, v in (("default, feature cache cold", cold, x), ("default, feature cache warm (refit)", warm, y)):
            rows.append({"path": name, "seconds": s, "max_abs_diff": float((v - ref).abs().max()),
                         "bit_identical": torch.equal(v, ref)})
    for r in rows:
        r["tokens_per_s"] = tokens / r["seconds"]
        r["speedup_vs_old"] = old_s / r["seconds"]
        r["projected_pool_s"] = pool_tokens / r["tokens_per_s"]
        r["seconds"] = round(r["seconds"], 2)
    # The probe fit on features of this size (LBFGS), for scale.
    from safety_patch.gate.probe import fit_probe

    y = torch.tensor([float(i < len(harmful)) for i in chosen])
    _, fit_s = timed(lambda: fit_probe(ref, y) if 0 < float(y.mean()) < 1 else None)
    print(f"model {args.model}, layer {layer}; pool {len(pool)} prompts / {pool_tokens} tokens (train {counts}, val "
          f"{ {k: len(v) for k, v in val.items()} }); timed {len(prompts)} prompts / {tokens} tokens; "
          f"threads {torch.get_num_threads()}, load average {load[0]:.2f}")
    print(f"prefix tree: timed prompts {tree['timed']}, whole pool {tree['pool']} (token reads vs plain)")
    print_table(rows, ["path", "seconds", "tokens_per_s", "speedup_vs_old", "projected_pool_s", "max_abs_diff", "bit_identical"])
    print(f"probe fit (LBFGS) on {len(prompts)} x {ref.shape[1]} features: {fit_s:.2f}s; prompt pool built in {prep_s:.1f}s")
    from safety_patch.data.build import manifest_sha256

    # the data folder by name and manifest hash: no machine path in a committed result
    write(args.name, {"args": vars(args) | {"data": Path(args.data).name}, "data_manifest_sha256": manifest_sha256(args.data),
                      "layer": layer, "pool_prompts": len(pool), "pool_tokens": pool_tokens,
                      "timed_prompts": len(prompts), "timed_tokens": tokens, "counts": counts, "prefix_tree": tree,
                      "load_average_at_start": load, "load_average_at_end": os.getloadavg(), "rows": rows,
                      "probe_fit_seconds": fit_s, "prompt_pool_seconds": prep_s}, run=(ap, args))


if __name__ == "__main__":
    main()
