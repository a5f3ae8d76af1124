"""Breadth of the gate's pool by phrasing, measured leave-one-source-out on validation (issue 23 item 5).

Run: .venv/bin/python experiments/gate_phrasings.py --data DIR [--model default] [--target-fpr 0.03]
     [--families reask,context,...] [--l2 0.1,1] [--no-attacks] [--extra-harmful TSV]
     [--probes mass-mean,lda:0.1,source-balanced]

The shipped gate (final-norm, last prompt token, layer ``GateFitConfig().resolved_layer``) is fit
on the default pool plus re-asked prompts in each subset of phrasing families asked for
(``gate.phrasings.PHRASINGS``; ``reask`` alone is the default), with ``rephrased`` prompts per family
and side. Features come from ``gate.features.cached_features`` (shared with ``gate fit`` and ``train``
for the default pool and the validation sets).
Measured on the **validation** split only, as experiments/gate_candidates.py does:

* ``val``: threshold at ``--target-fpr`` on the validation benign pool (borderline + general +
  wrapped benign); share fired per set; AUROC direct and wrapped;
* ``loso``: refit without each harmful source (its train rows, wrapped and re-asked requests),
  threshold as above; caught share of that source's direct requests (train + val, never seen),
  and at the logit where 5% of validation borderline (safe look-alike) prompts fire (issue 23's
  bar: >= 90% there);
* ``attacks``: the unseen rule attacks on validation direct requests (caught) and their cleaned
  controls (fired on benign); a framing family must not teach the gate an attack's form.

``--probes``: other probe forms on the default pool, measured the same way beside the shipped
logistic probe: the mass-mean probe and shrinkage LDA (:func:`fit_mass_mean`), and the logistic
probe with each harmful source weighted alike (:func:`fit_source_balanced`).

Prints a table, writes experiments/results/gate_phrasings.json (n and 95% intervals per figure).
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write  # noqa: E402


def fit_mass_mean(x, y, layer: int, norm: dict, alpha: float = 1.0):
    """A linear gate whose weight is the class-mean difference of the standardised features, after
    shrinkage LDA: w = ((1 - alpha) S + alpha (tr S / d) I)^-1 (mu_harmful - mu_benign), S the
    class-balanced within-class covariance. alpha = 1 is the mass-mean probe (difference of means;
    Marks & Tegmark 2023, "The Geometry of Truth", report it generalises out of distribution better
    than logistic regression; Arditi et al. 2024 read refusal along such a direction). Same form as
    the shipped gate (final-norm features when ``norm``: no mean, no bias), so the threshold is set as
    for any gate."""
    import torch

    from safety_patch.gate.probe import Gate

    d = x.shape[1]
    shell = Gate(layer, 0.0, torch.ones(d), 0.0, torch.zeros(d), torch.ones(d), **norm)
    f = shell.features(x)
    sd = f.std(0) + 1e-6
    mu = f.mean(0) if not norm else torch.zeros(d)
    z = (f - mu) / sd
    pos, neg = z[y > 0], z[y == 0]
    diff = pos.mean(0) - neg.mean(0)
    if alpha >= 1.0:
        w = diff
    else:
        cov = 0.5 * (torch.cov(pos.T) + torch.cov(neg.T))
        w = torch.linalg.solve((1 - alpha) * cov + alpha * (torch.trace(cov) / d) * torch.eye(d), diff)
    w = w / w.norm()
    return Gate(layer, 0.0, w, 0.0, mu, sd, **norm)


def fit_source_balanced(x, y, sources, layer: int, l2: float, norm: dict):
    """The shipped probe (``gate.fit_probe`` on final-norm features, no intercept) with each
    harmful source weighted to the same total (half the loss over the harmful sources, half over
    the benign prompts) instead of each harmful prompt alike: a source with many rows
    (Do-Not-Answer) no longer sets the direction alone (a group-balanced objective, the simplest
    form of group DRO)."""
    import torch

    from safety_patch.gate.probe import Gate, fit_probe

    d = x.shape[1]
    shell = Gate(layer, 0.0, torch.ones(d), 0.0, torch.zeros(d), torch.ones(d), **norm)
    labels = y.tolist()
    names = sorted({s for s, v in zip(sources, labels, strict=True) if v > 0}, key=str)
    wt = torch.zeros(len(y))
    for name in names:
        rows = torch.tensor([s == name and v > 0 for s, v in zip(sources, labels, strict=True)])
        wt[rows] = 0.5 / len(names) / int(rows.sum())
    wt[y == 0] = 0.5 / int((y == 0).sum())
    # fit_probe takes the mean of weight x loss: weights summing to n give the same scale as its class balance
    w, b, mu, sd = fit_probe(shell.features(x), y, l2, intercept=False, sample_weight=wt * len(y))
    return Gate(layer, 0.0, w, b, mu, sd, **norm)


def main() -> None:
    import torch

    from safety_patch import runtime as rt
    from safety_patch.data.folder import DataFolder
    from safety_patch.evaluation.stats import proportion
    from safety_patch.gate.config import BATCHING, GateFitConfig, _norm_of
    from safety_patch.gate.features import cached_features, encode
    from safety_patch.gate.fit import fit_gate_probe
    from safety_patch.gate.metrics import _auroc_ci, threshold_at_fpr
    from safety_patch.gate.phrasings import PHRASINGS
    from safety_patch.gate.pool import (
        HELD_OUT_SETS,
        _gate_pool,
        attack_prompts,
        held_out_prompts,
        held_out_requests,
        unseen_attacks,
    )
    from safety_patch.models import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="default")
    ap.add_argument("--target-fpr", type=float, default=GateFitConfig().target_fpr)
    ap.add_argument("--families", default=",".join(PHRASINGS), help="families to measure (reask is always in)")
    ap.add_argument("--l2", default=None, help="extra L2 values for the default and the all-families pools")
    ap.add_argument("--no-attacks", action="store_true", help="skip the unseen rule attacks (faster)")
    ap.add_argument("--extra-harmful", default=None,
                    help="a TSV (category<TAB>request lines, e.g. src/safety_patch/resources/gate_harmful_prompts.tsv) of harmful requests from another source: '+extra' variants add "
                         "it to the pool; every variant gets it as a leave-one-source-out fold")
    ap.add_argument("--probes", default=None,
                    help="extra probe forms on the default pool, comma-separated: mass-mean, lda:ALPHA (shrinkage "
                         "ALPHA in (0, 1]; 1 = mass-mean), source-balanced; the logistic probe is always measured")
    ap.add_argument("--out-name", default="gate_phrasings")
    args = ap.parse_args()
    threads = rt.configure_threads()
    fams = ["reask"] + [f for f in args.families.split(",") if f and f != "reask"]
    base_cfg = GateFitConfig()
    cfg = GateFitConfig(phrasings=fams).validate()
    d = DataFolder.of(args.data)
    lm = load_model(args.model, device="cpu")
    tok = lm.tokenizer
    layer = cfg.resolved_layer(lm.model.config.num_hidden_layers)
    norm = _norm_of(lm.model, cfg)

    harmful, benign, counts, sources = _gate_pool(d, cfg)
    per = {f: [counts.get(f"rephrased_harmful_{f}", counts["rephrased_harmful"]),
               counts.get(f"rephrased_benign_{f}", counts["rephrased_benign"])] for f in fams}
    n_re_h, n_re_b = counts["rephrased_harmful"], counts["rephrased_benign"]
    # which family each pool row came from (None: the pool without re-asked prompts)
    # (harmful side: the hand-written requests come after the re-asked ones, gate.pool._gate_pool)
    n_w = counts.get("written_harmful", 0)
    fam_h: list[str | None] = [None] * (len(harmful) - n_re_h - n_w)
    fam_b: list[str | None] = [None] * (len(benign) - n_re_b)
    for f in fams:
        fam_h += [f] * per[f][0]
        fam_b += [f] * per[f][1]
    fam_h += [None] * n_w
    held = held_out_prompts(d, "val", cfg.seed)
    attacks = [] if args.no_attacks else unseen_attacks(d)
    att = attack_prompts(d, "val", attacks) if attacks else {}
    names = sorted({s for s in sources if s is not None})
    loso_pos = {s: v["direct"] for s, v in held_out_requests(d, names, "val").items()}
    # Features in three parts. The default pool (every family but reask's extra draws left out)
    # and the validation sets are read exactly as `gate fit` / `train` read them
    # (gate.features.cached_features with the same prompt lists), so either run warms the other's cache;
    # the extra families, LOSO requests and attacks are read once more.
    if n_w and fams[1:]:
        # the extra families' rows sit before the written ones; the split below assumes they come last
        raise SystemExit("--families beyond reask: with the written source in the pool (the default) this script "
                         "cannot yet tell their rows apart (it reads them as the last harmful rows); sessions 12-13 "
                         "measured the families without it")
    n_h0 = len(harmful) - sum(per[f][0] for f in fams[1:])
    n_b0 = len(benign) - sum(per[f][1] for f in fams[1:])
    t0 = time.time()
    lm.model.eval()
    x_pool0 = cached_features(lm.model, tok, encode(tok, harmful[:n_h0] + benign[:n_b0]), layer, BATCHING,
                              lm.fingerprint)
    names_val = [k for k in HELD_OUT_SETS if held[k]]
    x_val = cached_features(lm.model, tok, encode(tok, [m for k in names_val for m in held[k]]), layer, BATCHING,
                            lm.fingerprint)
    rest: dict[str, list] = {"extra_harmful": harmful[n_h0:], "extra_benign": benign[n_b0:]}
    rest |= {f"att:{a}:{k}": [m for m, _ in v] for a, s in att.items() for k, v in s.items()}
    rest |= {f"loso:{s}": v for s, v in loso_pos.items()}
    flat = [m for v in rest.values() for m in v]
    x_rest = cached_features(lm.model, tok, encode(tok, flat), layer, BATCHING, lm.fingerprint)
    feat_s = time.time() - t0
    print(f"features: pool {len(x_pool0)}, val {len(x_val)}, rest {len(x_rest)} prompts in {feat_s:.0f} s; "
          f"layer {layer}; threads {threads}", flush=True)
    g, at = {}, 0
    for name, v in rest.items():
        g[name], at = x_rest[at : at + len(v)], at + len(v)
    at = 0
    for k in names_val:
        g[f"val:{k}"], at = x_val[at : at + len(held[k])], at + len(held[k])
    g["pool_harmful"] = torch.cat([x_pool0[:n_h0], g.pop("extra_harmful")])
    g["pool_benign"] = torch.cat([x_pool0[n_h0:], g.pop("extra_benign")])
    groups = {"pool_harmful": harmful, "pool_benign": benign, **{f"val:{k}": held[k] for k in names_val}, **rest}
    if args.extra_harmful:
        # A further harmful source (category, request TSV): its requests and each re-asked once join
        # the pool in the '+extra' variants, and it is a third leave-one-source-out fold in every
        # variant (for those without it, that fold is simply a source the gate never saw).
        import random

        from safety_patch.gate.phrasings import reask

        xs = "extra:" + Path(args.extra_harmful).stem
        lines = Path(args.extra_harmful).read_text(encoding="utf-8").splitlines()
        reqs = [ln.split("\t", 1)[1].strip() for ln in lines if "\t" in ln and ln.split("\t", 1)[1].strip()]
        rng = random.Random(0)
        direct = [[{"role": "user", "content": q}] for q in reqs]
        re_asked = [[{"role": "user", "content": reask(q, rng)}] for q in reqs]
        x_extra = cached_features(lm.model, tok, encode(tok, direct + re_asked), layer, BATCHING, lm.fingerprint)
        g["pool_harmful"] = torch.cat([g["pool_harmful"], x_extra])
        g[f"loso:{xs}"] = x_extra[: len(direct)]
        harmful = harmful + direct + re_asked
        sources = list(sources) + [xs] * (2 * len(direct))
        fam_h += ["extra"] * (2 * len(direct))
        names.append(xs)
        groups["extra_source"] = direct

    x_train = torch.cat([g["pool_harmful"], g["pool_benign"]])
    y = torch.tensor([1.0] * len(harmful) + [0.0] * len(benign))
    src = list(sources) + [None] * len(benign)
    fam = fam_h + fam_b

    def rate(z, t):
        return proportion(int((z > t).sum()), len(z))

    def fit(x, yy, c, probe, src_rows=None):
        if probe == "logistic":
            return fit_gate_probe(x, yy, layer, c, norm)
        if probe == "source-balanced":
            return fit_source_balanced(x, yy, src_rows, layer, c.l2, norm)
        return fit_mass_mean(x, yy, layer, norm, 1.0 if probe == "mass-mean" else float(probe.split(":")[1]))

    def measure(use_fams: tuple[str, ...], l2: float, probe: str = "logistic") -> dict:
        c = GateFitConfig(l2=l2, phrasings=list(use_fams) or ["reask"])
        use = torch.tensor([f is None or f in use_fams for f in fam])
        gate = fit(x_train[use], y[use], c, probe, [v for v, u in zip(src, use.tolist(), strict=True) if u])
        z = {k: gate.scores(v) for k, v in g.items() if not k.startswith("pool")}
        pool = torch.cat([z["val:borderline"], z["val:general"], z["val:wrapped_benign"]])
        t = threshold_at_fpr(pool, args.target_fpr)
        r = {"families": list(use_fams), "l2": l2, "probe": probe, "n_train": int(use.sum()), "threshold": t,
             "val": {"auroc_direct": _auroc_ci(z["val:harmful_direct"].tolist(),
                                               torch.cat([z["val:borderline"], z["val:general"]]).tolist()),
                     "auroc_wrapped": _auroc_ci(z["val:harmful_wrapped"].tolist(), z["val:wrapped_benign"].tolist()),
                     "fired": {k.split(":", 1)[1]: rate(v, t) for k, v in z.items() if k.startswith("val:")}},
             "attacks": {a: {"caught": rate(z[f"att:{a}:harmful"], t), "fired_on_benign": rate(z[f"att:{a}:benign"], t)}
                         for a in attacks},
             "loso": {}}
        for s in names:
            keep = torch.tensor([v != s for v in src]) & use
            gs = fit(x_train[keep], y[keep], c, probe, [v for v, u in zip(src, keep.tolist(), strict=True) if u])
            zs = {k: gs.scores(g[k]) for k in ("val:borderline", "val:general", "val:wrapped_benign", f"loso:{s}")}
            ts = threshold_at_fpr(torch.cat([zs["val:borderline"], zs["val:general"], zs["val:wrapped_benign"]]),
                                  args.target_fpr)
            tb = threshold_at_fpr(zs["val:borderline"], 0.05)
            r["loso"][s] = {"threshold": ts, "caught_direct": rate(zs[f"loso:{s}"], ts),
                            "auroc_direct": _auroc_ci(zs[f"loso:{s}"].tolist(),
                                                      torch.cat([zs["val:borderline"], zs["val:general"]]).tolist()),
                            "caught_direct_at_5pct_lookalike_fpr": rate(zs[f"loso:{s}"], tb)}
        return r

    variants = [()] + [("reask",)] + [("reask", f) for f in fams[1:]] + ([tuple(fams)] if len(fams) > 2 else [])
    variants += [tuple(f for f in fams if f != drop) for drop in fams[1:]] if len(fams) > 3 else []
    if args.extra_harmful:
        variants += [("reask", "extra"), (*fams, "extra")]
    runs = [(v, base_cfg.l2, "logistic") for v in dict.fromkeys(variants)]
    if args.l2:
        runs += [(v, float(l2), "logistic") for v, l2 in itertools.product([("reask",), tuple(fams)], args.l2.split(","))]
    if args.probes:
        runs += [(("reask",), base_cfg.l2, p) for p in args.probes.split(",") if p]
    results, table = [], []
    for v, l2, probe in runs:
        r = measure(v, l2, probe)
        results.append(r)
        f = r["val"]["fired"]
        row = {"families": "+".join(v) or "(none)", "l2": l2, "probe": probe, "n": r["n_train"],
               "AUROC dir": r["val"]["auroc_direct"]["value"], "dir%": 100 * f["harmful_direct"]["value"],
               "wrap%": 100 * f["harmful_wrapped"]["value"], "border%": 100 * f["borderline"]["value"],
               "wrapsafe%": 100 * f["wrapped_benign"]["value"]}
        if attacks:
            row["att caught%"] = 100 * sum(a["caught"]["value"] for a in r["attacks"].values()) / len(attacks)
            row["att benign%"] = 100 * sum(a["fired_on_benign"]["value"] for a in r["attacks"].values()) / len(attacks)
        for s in names:
            row[f"LOSO {s}%"] = 100 * r["loso"][s]["caught_direct"]["value"]
            row[f"{s}@5%look"] = 100 * r["loso"][s]["caught_direct_at_5pct_lookalike_fpr"]["value"]
            row[f"{s} AUROC"] = r["loso"][s]["auroc_direct"]["value"]
        table.append(row)
        print(f"  {row['families']} l2={l2} {probe}: done", flush=True)
    print_table(table)
    write(args.out_name, {"data": str(args.data), "data_manifest_seed": d.manifest.get("seed"), "layer": layer,
                          "target_fpr": args.target_fpr, "attacks": attacks, "feature_seconds": round(feat_s, 1),
                          "threads": threads, "n": {k: len(v) for k, v in groups.items() if k not in ("extra_harmful", "extra_benign")}, "pool": counts,
                          "table": table, "results": results}, args)


if __name__ == "__main__":
    main()
