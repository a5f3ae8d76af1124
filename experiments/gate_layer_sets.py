"""Which layers the gate reads, measured out of template family and out of source (issue 23 items 1 and 3).

Run: .venv/bin/python experiments/gate_layer_sets.py --data DIR [--model default] [--layers 12,18,21]
     [--sets 12;18;21;18+21;12+18+21] [--folds 5] [--target-fpr 0.03]

Session 12 (experiments/gate_candidates.py, a smaller pool) found three layers concatenated
lifted validation AUROC on wrapped prompts from 0.909 to 0.955. Since then the pool has grown
(re-asked prompts, the written source) and the report has gained a leave-one-template-family-out
figure (``gate.crossfit.leave_one_family_out``), which says the shipped gate fires on ~10% of wrapped
safe prompts in train template families it never saw, where validation's 31 families say 4.5%.
This script asks whether reading more layers closes that gap.

Features: the default gate's (last prompt token, final-norm image of each layer's state),
read with ``gate.features.cached_features`` for each layer, on the default pool (``GateFitConfig()``),
the validation sets and the leave-one-source-out requests. A layer set's probe is the shipped
logistic probe (``gate.fit_probe``, no intercept, the default L2) on the concatenated features.
Measured on the **validation** split and the train split's own template families only:

* ``val``: threshold at ``--target-fpr`` on the validation benign pool, share fired per set,
  AUROC direct and wrapped;
* ``lofo``: as ``gate.crossfit.leave_one_family_out`` (same folds): out-of-family wrapped harmful
  caught and wrapped safe fired at the product's threshold, AUROC;
* ``loso``: caught share of each held-out source's direct requests at the logit where 5% of
  validation look-alikes fire (issue 23's bar), and C1, their mean.

``--later-weight c1,c2,...`` (session 20): each layer set is also fit with the standardised
features of every layer after its first multiplied by c before the probe is fit (the same
logistic loss and L2): c < 1 penalises the later layers' weights more (c -> 0 is the first layer
alone), c = 1 is the plain concatenation. A gate stores such a probe exactly (its ``std`` divided
by c on those features). It asks whether a point between layer 18 alone and 18 + 21 keeps most
of the later layer's out-of-family gain at a smaller out-of-source loss.

``--family-fpr F`` (session 20): each set also with its threshold raised until F of the
out-of-family wrapped safe prompts fire (``GateFitConfig.family_fpr``): the "cal" columns are
in-sample (the raise is set on the prompts they count); the "nested" columns set each outer
fold's raise on an inner leave-one-family-out of the other folds' families, an honest
out-of-family figure for the raised threshold.

Prints a table, writes experiments/results/gate_layer_sets.json (n and 95% intervals).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write  # noqa: E402


def main() -> None:
    import torch

    from safety_patch import runtime as rt
    from safety_patch.data.folder import DataFolder
    from safety_patch.evaluation.stats import proportion
    from safety_patch.gate.config import BATCHING, GateFitConfig, _norm_of
    from safety_patch.gate.features import cached_features, encode, pool_features
    from safety_patch.gate.fit import family_folds
    from safety_patch.gate.metrics import _auroc_ci, threshold_at_fpr
    from safety_patch.gate.pool import (
        HELD_OUT_SETS,
        _gate_pool,
        held_out_prompts,
        held_out_requests,
        template_family,
    )
    from safety_patch.gate.probe import fit_probe
    from safety_patch.models import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="default")
    ap.add_argument("--layers", default="12,18,21")
    ap.add_argument("--sets", default="12;18;21;18+21;12+18+21")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--target-fpr", type=float, default=GateFitConfig().target_fpr)
    ap.add_argument("--l2", default=None, help="L2 penalties to measure each set at, comma-separated (default: the gate's)")
    ap.add_argument("--later-weight", default="1", help="scales for the later layers' standardised features, comma-separated")
    ap.add_argument("--family-fpr", type=float, default=None,
                    help="also report each set with its threshold raised until this share of the out-of-family "
                         "wrapped safe prompts fires (the 'cal' columns)")
    ap.add_argument("--out-name", default="gate_layer_sets")
    args = ap.parse_args()
    threads = rt.configure_threads()
    cfg = GateFitConfig().validate()
    layers = [int(v) for v in args.layers.split(",")]
    sets = [tuple(int(v) for v in s.split("+")) for s in args.sets.split(";")]
    assert all(v in layers for s in sets for v in s), "every layer of --sets must be in --layers"
    d = DataFolder.of(args.data)
    lm = load_model(args.model, device="cpu")
    tok = lm.tokenizer
    norm = _norm_of(lm.model, cfg)
    lm.model.eval()

    harmful, benign, counts, sources = _gate_pool(d, cfg)
    held = held_out_prompts(d, "val", cfg.seed)
    names_val = [k for k in HELD_OUT_SETS if held[k]]
    src_names = sorted({s for s in sources if s is not None})
    loso_pos = {s: v["direct"] for s, v in held_out_requests(d, src_names, "val").items()}
    val_ids = encode(tok, [m for k in names_val for m in held[k]])
    loso_ids = encode(tok, [m for v in loso_pos.values() for m in v])

    def final_norm(h):
        return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm["norm_eps"]) * norm["norm_weight"]

    t0 = time.time()
    feats = {}
    for L in layers:
        feats[L] = {"pool": final_norm(pool_features(lm.model, tok, harmful, benign, counts, L, BATCHING,
                                                     lm.fingerprint)),
                    "val": final_norm(cached_features(lm.model, tok, val_ids, L, BATCHING, lm.fingerprint)),
                    "loso": final_norm(cached_features(lm.model, tok, loso_ids, L, BATCHING, lm.fingerprint))}
        print(f"layer {L}: features in {time.time() - t0:.0f} s", flush=True)
    feat_s = time.time() - t0

    y = torch.tensor([1.0] * len(harmful) + [0.0] * len(benign))
    src = list(sources) + [None] * len(benign)
    # the folds of gate.crossfit.leave_one_family_out
    templates = d.templates("train")
    fam = [template_family(m[-1]["content"], templates) for m in harmful + benign]
    fold, fold_of = family_folds(fam, args.folds, 0)
    order, k = sorted(fold_of), len(set(fold_of.values()))

    def rate(z, t):
        return proportion(int((z > t).sum()), len(z))

    def split_val(x):
        out, at = {}, 0
        for name in names_val:
            out[name], at = x[at : at + len(held[name])], at + len(held[name])
        return out

    def split_loso(x):
        out, at = {}, 0
        for s, v in loso_pos.items():
            out[s], at = x[at : at + len(v)], at + len(v)
        return out

    l2s = [float(v) for v in args.l2.split(",")] if args.l2 else [cfg.l2]
    l2_now = {"value": cfg.l2}
    later = {"scale": None}  # [features] multipliers after standardisation, or None

    def fit(x, yy):
        # the later layers' scale is gate.fit_probe's feature_scale: the shipped fit's group L2
        w, _, _, sd = fit_probe(x, yy, l2_now["value"], intercept=False, feature_scale=later["scale"])
        return lambda z: (z / sd) @ w

    def val_threshold(score, xv):
        zv = split_val(score(xv))
        return threshold_at_fpr(torch.cat([zv["borderline"], zv["general"], zv["wrapped_benign"]]), args.target_fpr)

    results, table = [], []
    weights = [float(v) for v in args.later_weight.split(",")]
    runs = [(ls, l2, c) for ls in sets for l2 in l2s for c in (weights if len(ls) > 1 else [1.0])]
    for ls, l2, c in runs:
        l2_now["value"] = l2
        dim = feats[ls[0]]["pool"].shape[1]
        later["scale"] = None if c == 1.0 else torch.cat([torch.ones(dim), torch.full((dim * (len(ls) - 1),), c)])
        x = torch.cat([feats[L]["pool"] for L in ls], 1)
        xv = torch.cat([feats[L]["val"] for L in ls], 1)
        xl = torch.cat([feats[L]["loso"] for L in ls], 1)
        score = fit(x, y)
        t = val_threshold(score, xv)
        zv = split_val(score(xv))
        r = {"layers": list(ls), "l2": l2, "later_weight": c, "threshold": t,
             "val": {"fired": {n: rate(v, t) for n, v in zv.items()},
                     "auroc_direct": _auroc_ci(zv["harmful_direct"].tolist(),
                                               torch.cat([zv["borderline"], zv["general"]]).tolist()),
                     "auroc_wrapped": _auroc_ci(zv["harmful_wrapped"].tolist(), zv["wrapped_benign"].tolist())}}
        mh, mb = [], []
        for i in range(k):
            out = fold == i
            sk = fit(x[~out], y[~out])
            m = sk(x[out]) - val_threshold(sk, xv)
            mh.append(m[y[out] > 0])
            mb.append(m[y[out] == 0])
        mh, mb = torch.cat(mh), torch.cat(mb)
        r["lofo"] = {"wrapped_harmful_caught": rate(mh, 0.0), "wrapped_benign_fired": rate(mb, 0.0),
                     "auroc": _auroc_ci(mh.tolist(), mb.tolist()),
                     "wrapped_harmful_caught_at_5pct_wrapped_benign_fpr": rate(mh, threshold_at_fpr(mb, 0.05))}
        if args.family_fpr is not None:
            # the threshold raised (never lowered) until at most --family-fpr of the out-of-family
            # wrapped safe prompts fire: a margin shift d >= 0 over the product's threshold
            shift = max(0.0, threshold_at_fpr(mb, args.family_fpr))
            r["calibrated"] = {"shift": shift, "val_fired": {n: rate(v, t + shift) for n, v in zv.items()},
                               "lofo_wrapped_harmful_caught": rate(mh, shift),
                               "lofo_wrapped_benign_fired": rate(mb, shift)}
            # Nested: the raise set on an inner leave-one-family-out of each outer fold's remaining
            # families, applied to the outer fold's held-out prompts. The figures above are
            # in-sample (the raise is set on the prompts they count); these are not.
            nh, nb = [], []
            for i in range(k):
                out = fold == i
                inner = [j for j in range(k) if j != i]
                ih, ib = [], []
                for j in inner:
                    o2 = fold == j
                    s2 = fit(x[~out & ~o2], y[~out & ~o2])
                    m2 = s2(x[o2]) - val_threshold(s2, xv)
                    ih.append(m2[y[o2] > 0])
                    ib.append(m2[y[o2] == 0])
                r_i = max(0.0, threshold_at_fpr(torch.cat(ib), args.family_fpr))
                sk = fit(x[~out], y[~out])
                m = sk(x[out]) - val_threshold(sk, xv) - r_i
                nh.append(m[y[out] > 0])
                nb.append(m[y[out] == 0])
            nh, nb = torch.cat(nh), torch.cat(nb)
            r["calibrated"]["nested"] = {"lofo_wrapped_harmful_caught": rate(nh, 0.0),
                                         "lofo_wrapped_benign_fired": rate(nb, 0.0)}
        r["loso"] = {}
        for s in src_names:
            keep = torch.tensor([v != s for v in src])
            ss = fit(x[keep], y[keep])
            zs = split_val(ss(xv))
            tb = threshold_at_fpr(zs["borderline"], 0.05)
            r["loso"][s] = {"caught_direct_at_5pct_lookalike_fpr": rate(split_loso(ss(xl))[s], tb)}
        results.append(r)
        f = r["val"]["fired"]
        row = {"layers": "+".join(map(str, ls)), "l2": l2, "later": c, "val dir%": 100 * f["harmful_direct"]["value"],
               "val wrap%": 100 * f["harmful_wrapped"]["value"], "val border%": 100 * f["borderline"]["value"],
               "val wrapsafe%": 100 * f["wrapped_benign"]["value"], "val AUROC wrap": r["val"]["auroc_wrapped"]["value"],
               "LOFO wrap%": 100 * r["lofo"]["wrapped_harmful_caught"]["value"],
               "LOFO wrapsafe%": 100 * r["lofo"]["wrapped_benign_fired"]["value"],
               "LOFO AUROC": r["lofo"]["auroc"]["value"],
               "LOFO wrap%@5%": 100 * r["lofo"]["wrapped_harmful_caught_at_5pct_wrapped_benign_fpr"]["value"]}
        for s in src_names:
            row[f"LOSO {s}%"] = 100 * r["loso"][s]["caught_direct_at_5pct_lookalike_fpr"]["value"]
        row["C1"] = sum(row[f"LOSO {s}%"] for s in src_names) / len(src_names)
        if "calibrated" in r:
            c_ = r["calibrated"]
            row |= {"cal shift": c_["shift"], "cal val dir%": 100 * c_["val_fired"]["harmful_direct"]["value"],
                    "cal val wrap%": 100 * c_["val_fired"]["harmful_wrapped"]["value"],
                    "cal val border%": 100 * c_["val_fired"]["borderline"]["value"],
                    "cal val wrapsafe%": 100 * c_["val_fired"]["wrapped_benign"]["value"],
                    "cal LOFO wrap%": 100 * c_["lofo_wrapped_harmful_caught"]["value"],
                    "cal LOFO wrapsafe%": 100 * c_["lofo_wrapped_benign_fired"]["value"],
                    "nested LOFO wrap%": 100 * c_["nested"]["lofo_wrapped_harmful_caught"]["value"],
                    "nested LOFO wrapsafe%": 100 * c_["nested"]["lofo_wrapped_benign_fired"]["value"]}
        table.append(row)
        print(f"  {row['layers']}: done", flush=True)
    print_table(table)
    write(args.out_name, {"data": str(args.data), "data_manifest_seed": d.manifest.get("seed"), "layers": layers,
                          "target_fpr": args.target_fpr, "family_fpr": args.family_fpr, "feature_seconds": round(feat_s, 1), "threads": threads,
                          "pool": counts, "families": len(order), "folds": k,
                          "n": {n: len(held[n]) for n in names_val} | {f"loso:{s}": len(v) for s, v in loso_pos.items()},
                          "table": table, "results": results}, args)


if __name__ == "__main__":
    main()
