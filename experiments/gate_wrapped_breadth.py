"""More wrapped prompts in the gate's pool, measured out of template family (issue 23 items 1 and 5).

Run: .venv/bin/python experiments/gate_wrapped_breadth.py --data DIR [--model default]
     [--extra-benign 1200] [--extra-harmful 800] [--folds 5] [--target-fpr 0.03]

Why: the shipped gate sends 4.5% of the validation split's wrapped *safe* prompts to the refusal
adapter, but 11.7% of the test split's (sessions 12 and 14): validation holds 110 such prompts
in 31 template families, too few families to tell how the gate does on a family it never saw.

What it measures, on the **validation** split and the train split's own templates only:

* ``val``: the product's threshold (``--target-fpr`` on the validation benign pool: borderline +
  general + wrapped benign) and the share fired per validation set; AUROC of wrapped harmful vs
  wrapped safe;
* ``lotfo``: leave-one-template-family-out, cross-fitted over the *train* split's template
  families (``--folds`` groups of families, seeded): refit without every pool prompt wrapped in
  a fold's families (both sides), threshold set as the product sets it, then the share of that
  fold's wrapped safe prompts fired and wrapped harmful prompts caught. Every wrapped pool
  prompt is scored once by a gate that never saw its family: 184 families on the seed-1 folder
  instead of validation's 31;
* ``loso``: leave-one-source-out as experiments/gate_phrasings.py measures it (caught at the
  logit where 5% of validation look-alikes fire).

Variants are nested: the shipped pool (``GateFitConfig()``), then extra wrapped benign prompts
(benign train prompts inside train templates, drawn with their own seeded generator so that the
shipped pool's draw is unchanged), then extra wrapped harmful requests as well. Features come from
``gate.features.cached_features`` (the shipped pool and validation sets as `gate fit` reads them).

Prints a table, writes experiments/results/gate_wrapped_breadth.json (n and 95% intervals).
"""

from __future__ import annotations

import argparse
import random
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
    from safety_patch.gate.fit import fit_gate_probe
    from safety_patch.gate.metrics import _auroc_ci, threshold_at_fpr
    from safety_patch.gate.pool import (
        HELD_OUT_SETS,
        _gate_pool,
        held_out_prompts,
        held_out_requests,
        template_family,
    )
    from safety_patch.models import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="default")
    ap.add_argument("--target-fpr", type=float, default=GateFitConfig().target_fpr)
    ap.add_argument("--extra-benign", type=int, default=1200)
    ap.add_argument("--extra-harmful", type=int, default=800)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--family-fpr", type=float, default=0.05,
                    help="the share of out-of-family wrapped safe prompts the calibrated threshold lets fire")
    ap.add_argument("--seed", type=int, default=1, help="the extras' and the folds' generator")
    ap.add_argument("--out-name", default="gate_wrapped_breadth")
    args = ap.parse_args()
    threads = rt.configure_threads()
    cfg = GateFitConfig().validate()
    d = DataFolder.of(args.data)
    lm = load_model(args.model, device="cpu")
    tok = lm.tokenizer
    layer = cfg.resolved_layer(lm.model.config.num_hidden_layers)
    norm = _norm_of(lm.model, cfg)
    lm.model.eval()

    harmful, benign, counts, sources = _gate_pool(d, cfg)
    templates = d.templates("train")
    # The extras: benign train prompts (single-turn, as the shipped wrapped ones: the pool's benign
    # side before its own wrapped and re-asked prompts) and harmful train requests, each in a train
    # template, drawn with replacement across rounds (the shipped draw already used each once).
    n_plain_b = counts["benign"]
    plain_b = benign[:n_plain_b]
    rows = d.rows("train")
    requests = sorted({r["meta"]["request"] for r in rows if r.get("meta", {}).get("request")})
    source_of = {r["meta"]["request"]: r["meta"].get("source") for r in rows if r.get("meta", {}).get("request")}
    rng = random.Random(args.seed)
    ex_b, ex_h, ex_h_src = [], [], []
    while len(ex_b) < args.extra_benign:
        for msgs in rng.sample(plain_b, min(args.extra_benign - len(ex_b), len(plain_b))):
            ex_b.append(msgs[:-1] + [{"role": "user", "content": rng.choice(templates).render(msgs[-1]["content"])}])
    while len(ex_h) < args.extra_harmful:
        for req in rng.sample(requests, min(args.extra_harmful - len(ex_h), len(requests))):
            ex_h.append([{"role": "user", "content": rng.choice(templates).render(req)}])
            ex_h_src.append(source_of[req])

    held = held_out_prompts(d, "val", cfg.seed)
    names_val = [k for k in HELD_OUT_SETS if held[k]]
    src_names = sorted({s for s in sources if s is not None})
    loso_pos = {s: v["direct"] for s, v in held_out_requests(d, src_names, "val").items()}

    t0 = time.time()
    x_pool = pool_features(lm.model, tok, harmful, benign, counts, layer, BATCHING, lm.fingerprint)
    x_val = cached_features(lm.model, tok, encode(tok, [m for k in names_val for m in held[k]]), layer, BATCHING,
                            lm.fingerprint)
    x_loso = cached_features(lm.model, tok, encode(tok, [m for v in loso_pos.values() for m in v]), layer, BATCHING,
                             lm.fingerprint)
    x_ex = cached_features(lm.model, tok, encode(tok, ex_b + ex_h), layer, BATCHING, lm.fingerprint)
    feat_s = time.time() - t0
    print(f"features: pool {len(x_pool)}, val {len(x_val)}, loso {len(x_loso)}, extras {len(x_ex)} in {feat_s:.0f} s",
          flush=True)
    g, at = {}, 0
    for k in names_val:
        g[k], at = x_val[at : at + len(held[k])], at + len(held[k])
    at = 0
    for s, v in loso_pos.items():
        g[f"loso:{s}"], at = x_loso[at : at + len(v)], at + len(v)
    x_ex_b, x_ex_h = x_ex[: len(ex_b)], x_ex[len(ex_b) :]

    # every pool row: features, label, harmful source, train template family (None: unwrapped)
    fam_pool = [template_family(m[-1]["content"], templates) for m in harmful + benign]
    fam_ex_b = [template_family(m[-1]["content"], templates) for m in ex_b]
    fam_ex_h = [template_family(m[-1]["content"], templates) for m in ex_h]
    assert None not in fam_ex_b + fam_ex_h, "an extra wrapped prompt matched no train template"
    families = sorted({f for f in fam_pool + fam_ex_b + fam_ex_h if f is not None})
    frng = random.Random(args.seed)
    order = families[:]
    frng.shuffle(order)
    fold_of = {f: i % args.folds for i, f in enumerate(order)}

    def rate(z, t):
        return proportion(int((z > t).sum()), len(z))

    def threshold(gate):
        pool = torch.cat([gate.scores(g[k]) for k in ("borderline", "general", "wrapped_benign") if k in g])
        return threshold_at_fpr(pool, args.target_fpr)

    def measure(nb: int, nh: int) -> dict:
        x = torch.cat([x_pool[: len(harmful)], x_ex_h[:nh], x_pool[len(harmful) :], x_ex_b[:nb]])
        y = torch.tensor([1.0] * (len(harmful) + nh) + [0.0] * (len(benign) + nb))
        src = list(sources) + ex_h_src[:nh] + [None] * (len(benign) + nb)
        fam = fam_pool[: len(harmful)] + fam_ex_h[:nh] + fam_pool[len(harmful) :] + fam_ex_b[:nb]
        gate = fit_gate_probe(x, y, layer, cfg, norm)
        t = threshold(gate)
        z = {k: gate.scores(g[k]) for k in names_val}
        r = {"extra_wrapped_benign": nb, "extra_wrapped_harmful": nh, "n_train": len(y), "threshold": t,
             "val": {"fired": {k: rate(v, t) for k, v in z.items()},
                     "auroc_wrapped": _auroc_ci(z["harmful_wrapped"].tolist(), z["wrapped_benign"].tolist()),
                     "auroc_direct": _auroc_ci(z["harmful_direct"].tolist(),
                                               torch.cat([z["borderline"], z["general"]]).tolist())}}
        # leave-one-template-family-out, cross-fitted over the train families; scored on the
        # shipped pool's wrapped prompts only (the extras train, never score), so that every
        # variant is measured on the same prompts
        out_b, out_h = [], []
        fam_t = [fold_of.get(f, -1) for f in fam]
        shipped = torch.tensor([True] * len(harmful) + [False] * nh + [True] * len(benign) + [False] * nb)
        for k in range(args.folds):
            held_k = torch.tensor([v == k for v in fam_t])
            gk = fit_gate_probe(x[~held_k], y[~held_k], layer, cfg, norm)
            tk = threshold(gk)
            score = held_k & shipped
            sk = gk.scores(x[score]) - tk  # > 0: fires at the product's threshold
            yk = y[score]
            out_b.append(sk[yk == 0])
            out_h.append(sk[yk > 0])
        ob, oh = torch.cat(out_b), torch.cat(out_h)
        t5 = threshold_at_fpr(ob, 0.05)
        r["lotfo"] = {"wrapped_benign_fired": rate(ob, 0.0), "wrapped_harmful_caught": rate(oh, 0.0),
                      "auroc": _auroc_ci(oh.tolist(), ob.tolist()),
                      "wrapped_harmful_caught_at_5pct_wrapped_benign_fpr": rate(oh, t5),
                      "families": len(families), "folds": args.folds}
        # The product's family bound (GateFitConfig.family_fpr): raise the threshold by the
        # out-of-family margin at which at most --family-fpr of those wrapped safe prompts fire.
        q = threshold_at_fpr(ob, args.family_fpr)
        tc = t + max(0.0, q)
        r["calibrated"] = {"threshold": tc, "raised_by": max(0.0, q),
                           "val_fired": {k: rate(v, tc) for k, v in z.items()},
                           "lotfo_wrapped_benign_fired": rate(ob, max(0.0, q)),
                           "lotfo_wrapped_harmful_caught": rate(oh, max(0.0, q))}
        r["loso"] = {}
        for s in src_names:
            keep = torch.tensor([v != s for v in src])
            gs = fit_gate_probe(x[keep], y[keep], layer, cfg, norm)
            tb = threshold_at_fpr(gs.scores(g["borderline"]), 0.05)
            zs = gs.scores(g[f"loso:{s}"])
            r["loso"][s] = {"caught_direct_at_5pct_lookalike_fpr": rate(zs, tb),
                            "auroc_direct": _auroc_ci(zs.tolist(), torch.cat([gs.scores(g["borderline"]),
                                                                             gs.scores(g["general"])]).tolist())}
        return r

    nb2, nh2 = args.extra_benign // 2, args.extra_harmful // 2
    variants = [(0, 0), (nb2, 0), (nb2, nh2), (args.extra_benign, args.extra_harmful)]
    results, table = [], []
    for nb, nh in dict.fromkeys(variants):
        r = measure(nb, nh)
        results.append(r)
        f = r["val"]["fired"]
        row = {"wrapped benign": counts["wrapped_benign"] + nb, "wrapped harmful": counts.get("wrapped_harmful", 0) + nh,
               "val dir%": 100 * f["harmful_direct"]["value"], "val wrap%": 100 * f["harmful_wrapped"]["value"],
               "val border%": 100 * f["borderline"]["value"], "val wrapsafe%": 100 * f["wrapped_benign"]["value"],
               "val AUROC wrap": r["val"]["auroc_wrapped"]["value"],
               "LOTFO wrapsafe%": 100 * r["lotfo"]["wrapped_benign_fired"]["value"],
               "LOTFO wrap%": 100 * r["lotfo"]["wrapped_harmful_caught"]["value"],
               "LOTFO AUROC": r["lotfo"]["auroc"]["value"],
               "LOTFO wrap%@5%": 100 * r["lotfo"]["wrapped_harmful_caught_at_5pct_wrapped_benign_fpr"]["value"]}
        c = r["calibrated"]
        row |= {"cal +logit": c["raised_by"], "cal val dir%": 100 * c["val_fired"]["harmful_direct"]["value"],
                "cal val wrap%": 100 * c["val_fired"]["harmful_wrapped"]["value"],
                "cal val border%": 100 * c["val_fired"]["borderline"]["value"],
                "cal val wrapsafe%": 100 * c["val_fired"]["wrapped_benign"]["value"],
                "cal LOTFO wrap%": 100 * c["lotfo_wrapped_harmful_caught"]["value"]}
        for s in src_names:
            row[f"LOSO {s}%"] = 100 * r["loso"][s]["caught_direct_at_5pct_lookalike_fpr"]["value"]
        row["C1"] = sum(row[f"LOSO {s}%"] for s in src_names) / len(src_names)
        table.append(row)
        print(f"  +{nb} benign +{nh} harmful: done", flush=True)
    print_table(table)
    write(args.out_name, {"data": str(args.data), "data_manifest_seed": d.manifest.get("seed"), "layer": layer,
                          "target_fpr": args.target_fpr, "feature_seconds": round(feat_s, 1), "threads": threads,
                          "pool": counts, "families": len(families), "n": {k: len(held[k]) for k in names_val}
                          | {f"loso:{s}": len(v) for s, v in loso_pos.items()}, "table": table, "results": results}, args)


if __name__ == "__main__":
    main()
