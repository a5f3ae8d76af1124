"""Source directions projected out of the gate's features before the fit (issue 23 item 3/5), measured out of source.

Run: .venv/bin/python experiments/gate_source_nullspace.py --data DIR [--model default] [--ks 0,1,2,4,8,16]
     [--out-name NAME]

Refit without one harmful source, the default probe catches about half of that source's requests
at 5% look-alike false positives (C1, docs/gate.md): what it learns from the sources it sees is
partly *which source* a request comes from (HarmBench's imperative behaviours, the hand-written
requests' questions). Iterative nullspace projection (Ravfogel et al. 2020, "Null It Out", INLP)
removes, before the harm probe is fit, the directions along which a linear classifier tells the
seen harmful sources apart, so the probe can only use what they share. Per fold (a source held
out) and per k (INLP iterations; 0 is the product's probe):

1. standardise the pool's features (the probe's own mean/std);
2. k times: fit an L2 logistic classifier of harmful rows' source (one-vs-rest for each seen
   source, class-balanced), add its unit direction(s) to U, project U out of the features;
3. fit the product's probe (``gate.fit.fit_gate_probe``'s L2, layer weighting) on the projected
   features; the gate stays linear: its weight is the projection of the fitted weight.

Measured on validation and the train pool only: the held-out source's requests caught at the
refit's 5% validation borderline logit (C1 averages Do-Not-Answer and HarmBench) and at its 3%
validation benign logit; and a gate fit on the whole pool, at 3% of validation benign, per
validation set. Prints a table, writes experiments/results/NAME.json (n and Wilson intervals).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write  # noqa: E402


def source_directions(z, src, k: int, l2: float = 1e-2):
    """INLP: [d, m] orthonormal directions (m <= k·sources) along which the harmful rows' source is
    linearly predictable, found by k rounds of one-vs-rest logistic fits on the projected ``z``."""
    import torch

    from safety_patch.gate.probe import fit_probe

    names = sorted(set(src))
    u = torch.zeros(z.shape[1], 0)
    zp = z.clone()
    for _ in range(k):
        new = []
        for s in names if len(names) > 2 else names[:1]:
            y = torch.tensor([1.0 if v == s else 0.0 for v in src])
            w, _, _, sd = fit_probe(zp, y, l2, steps=100)
            new.append(w / sd)  # the direction in zp's own coordinates (fit_probe re-standardises)
        for v in new:
            v = v - u @ (u.T @ v)
            n = v.norm()
            if n > 1e-6:
                u = torch.cat([u, (v / n)[:, None]], 1)
        zp = z - (z @ u) @ u.T
    return u


class Projected:
    """The product's probe fit on the gate's standardised features with ``u`` projected out.

    feats(x): the gate's features (final-norm or residual); z = (feats - mu) / sd with mu = 0 for a
    final-norm gate (no intercept, as the product fits it); scores(x) = probe(P z)."""

    def __init__(self, shell, mu, sd, u):
        self.shell, self.mu, self.sd, self.u = shell, mu, sd, u
        self.w = self.b = self.mu2 = self.sd2 = None

    def project(self, x):
        z = (self.shell.features(x) - self.mu) / self.sd
        return z - (z @ self.u) @ self.u.T if self.u.shape[1] else z

    def scores(self, x):
        return ((self.project(x) - self.mu2) / self.sd2) @ self.w + self.b


def main() -> None:
    import torch

    from safety_patch import runtime as rt
    from safety_patch.data.folder import DataFolder
    from safety_patch.evaluation.stats import proportion
    from safety_patch.gate.config import BATCHING, GateFitConfig, _norm_of, model_layers
    from safety_patch.gate.features import cached_features, encode, pool_features
    from safety_patch.gate.fit import THRESHOLD_POOL, held_out_features
    from safety_patch.gate.metrics import _by_set, threshold_at_fpr
    from safety_patch.gate.pool import _gate_pool, held_out_requests
    from safety_patch.gate.probe import Gate, fit_probe
    from safety_patch.models import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="default")
    ap.add_argument("--ks", default="0,1,2,4,8,16")
    ap.add_argument("--out-name", default="gate_source_nullspace")
    args = ap.parse_args()
    threads = rt.configure_threads()
    d = DataFolder.of(args.data)
    lm = load_model(args.model, device="cpu")
    model, tok = lm.model, lm.tokenizer
    model.eval()
    cfg = GateFitConfig().validate()
    layers = model_layers(model, cfg)
    t0 = time.time()
    x_val, sizes = held_out_features(model, tok, layers, d, "val", cfg.seed, BATCHING, lm.fingerprint)
    val = _by_set(x_val, sizes)
    x_neg = torch.cat([val[k] for k in THRESHOLD_POOL if k in val])
    harmful, benign, counts, sources = _gate_pool(d, cfg)
    x = pool_features(model, tok, harmful, benign, counts, layers, BATCHING, lm.fingerprint)
    y = torch.tensor([1.0] * len(harmful) + [0.0] * len(benign))
    src = list(sources) + [None] * len(benign)
    names = sorted({s for s in sources if s is not None})
    loso = {s: v["direct"] for s, v in held_out_requests(d, names, "val", cfg.written_harmful_more).items()}
    x_loso = {s: cached_features(model, tok, encode(tok, loso[s]), layers, BATCHING, lm.fingerprint) for s in names}
    print(f"pool {len(harmful)} harmful / {len(benign)} benign; sources "
          f"{ {s: sum(v == s for v in sources) for s in names} }; features in {time.time() - t0:.0f} s", flush=True)

    def rate(z, t):
        return proportion(int((z > t).sum()), len(z))

    norm = _norm_of(model, cfg)
    per = x.shape[1] // len(layers)
    shell = Gate(layers[0], 0.0, torch.ones(x.shape[1]), 0.0, torch.zeros(x.shape[1]), torch.ones(x.shape[1]), **norm,
                 extra_layers=tuple(layers[1:]))
    scale = (torch.cat([torch.ones(per), torch.full((x.shape[1] - per,), float(cfg.extra_weight))])
             if len(layers) > 1 and cfg.extra_weight != 1.0 else None)

    def fit(keep, k):
        """fit_gate_probe's probe (same features, L2, layer weighting, intercept) after k INLP rounds."""
        fk, yk = shell.features(x[keep]), y[keep]
        mu = torch.zeros(fk.shape[1]) if norm else fk.mean(0)
        p = Projected(shell, mu, fk.std(0) + 1e-6, torch.zeros(fk.shape[1], 0))
        kept = [s for s, kk in zip(src, keep.tolist(), strict=True) if kk]
        has = torch.tensor([s is not None for s in kept]) & (yk > 0)
        if k:
            p.u = source_directions(p.project(x[keep])[has], [s for s, h in zip(kept, has.tolist(), strict=True) if h],
                                    k, cfg.l2)
        p.w, p.b, p.mu2, p.sd2 = fit_probe(p.project(x[keep]), yk, cfg.l2, intercept=not norm, feature_scale=scale)
        return p

    from safety_patch.gate.fit import fit_gate_probe

    check = fit(torch.ones(len(x), dtype=torch.bool), 0).scores(x_neg) - fit_gate_probe(x, y, layers, cfg, norm).scores(x_neg)
    print(f"k=0 against the product's probe: max |logit difference| {float(check.abs().max()):.2e}", flush=True)
    ks = [int(v) for v in args.ks.split(",")]
    results, table = [], []
    for k in ks:
        r = {"k": k, "loso": {}}
        row = {"k": k}
        for s in names:
            p = fit(torch.tensor([v != s for v in src]), k)
            t5 = threshold_at_fpr(p.scores(val["borderline"]), 0.05)
            tp = threshold_at_fpr(p.scores(x_neg), cfg.target_fpr)
            zs = p.scores(x_loso[s])
            r["loso"][s] = {"at_5pct_borderline_fpr": rate(zs, t5), "at_target_fpr": rate(zs, tp),
                            "directions": int(p.u.shape[1])}
            row[f"{s}@5%"] = 100 * r["loso"][s]["at_5pct_borderline_fpr"]["value"]
            row[f"{s}@tgt"] = 100 * r["loso"][s]["at_target_fpr"]["value"]
        row["C1"] = (row["donotanswer@5%"] + row["harmbench@5%"]) / 2
        p = fit(torch.ones(len(x), dtype=torch.bool), k)
        t = threshold_at_fpr(p.scores(x_neg), cfg.target_fpr)
        r["val"] = {name: rate(p.scores(v), t) for name, v in val.items()}
        r["directions_full"] = int(p.u.shape[1])
        for name in ("harmful_direct", "harmful_wrapped", "borderline", "wrapped_benign"):
            if name in r["val"]:
                row[f"val {name}%"] = 100 * r["val"][name]["value"]
        results.append(r)
        table.append(row)
        print(f"  k={k}: {row}", flush=True)
    print_table(table)
    write(args.out_name, {"data": str(args.data), "layers": list(layers), "threads": threads,
                          "seconds": round(time.time() - t0, 1), "n": {"val": sizes, **{s: len(v) for s, v in loso.items()}},
                          "table": table, "results": results}, args)


if __name__ == "__main__":
    main()
