"""A wider gate pool by harm category and by look-alike category (issue 23 item 5), measured out of source.

Run: .venv/bin/python experiments/gate_pool_breadth.py --data DIR [--model default]
     [--harmful TSV] [--lookalikes TSV] [--l2 X] [--extra-weight C] [--variants default,+both,...]

Session 13 found that what a leave-one-source-out fold misses is *content*: refit without
Do-Not-Answer, the probe has never seen requests about private people's data or demeaning
questions about groups, and no rewording of HarmBench supplies them; a hand-written source by
category (129 requests) lifted HarmBench held out by 18 points. Session 25 looked at the default
gate's misses per category (Do-Not-Answer held out: privacy 30/181 caught, harassment/hate 23/118,
illegal 131/183; HarmBench held out: misinformation 7/32) and wrote two more files, in its own
words and by category, none near a Do-Not-Answer or HarmBench request (3-gram Jaccard < 0.5,
0 pairs; < 0.3: 2 pairs, both "What's the best way to ..."):

* ``--harmful``: 144 more harmful requests (privacy of private people and companies, hate,
  harassment, misinformation, sexual, cyber, weapons, illegal, drugs, self-harm, dangerous
  medical advice, violence, extremism, fraud, requests inside a line of context);
* ``--lookalikes``: 176 safe look-alikes by the categories issue 23 names (homonyms, figurative
  language, safe targets, safe contexts, definitions, real and nonsense discrimination,
  history, public and fictional figures' privacy, one's own privacy, persuasive writing on
  benign claims, questions about groups, safety, security, medical, legal, writing), none near
  a prompt of the evaluated look-alike set or the train-only look-alikes (3-gram Jaccard < 0.5).

Because the files were written after reading the held-out folds' misses, the gain they give a
held-out *source* is not an unbiased estimate of the gain on a source nobody has looked at; the
project's independent check (sets kept outside it) is that estimate. What the script can say
honestly on its own: each variant's validation figures, leave-one-source-out on Do-Not-Answer,
HarmBench, the session-13 written source (written before this look) and the new file, and
two-fold cross-fitting of the new files (fit on half of each, scored on the other half, against
the default gate, which never saw either).

Variants (the default pool, two layers, every default of ``GateFitConfig``; each file's lines
join as written and re-asked, ``gate_fit.reask``): ``default``; ``+harmful``; ``+lookalikes``;
``+both``. Each at the product's threshold: 3% of the validation benign pool, raised until 5% of
out-of-family wrapped safe prompts fire (``GateFitConfig.family_fpr``, the fit's own
leave-one-family-out; the nested figure is not recomputed here). Leave-one-source-out: caught at
the refit's 5%-look-alike logit (validation look-alikes; issue 23's bar) and at its own product
threshold (3% of the validation benign pool, unraised). Prints a table, writes
experiments/results/gate_pool_breadth.json (n and Wilson 95% intervals).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESOURCES = "src/safety_patch/resources"  # relative to the repository root (as recorded in the results)


def read_tsv(path: Path) -> list[tuple[str, str]]:
    """``category<TAB>prompt`` lines; SystemExit naming the file and line for anything else."""
    from safety_patch.data.prompts import parse_tsv
    from safety_patch.errors import SafetyPatchError

    try:
        return parse_tsv(path.read_text(encoding="utf-8"), str(path))
    except (OSError, SafetyPatchError) as e:
        raise SystemExit(str(e)) from None


def main() -> None:
    import torch

    from safety_patch import runtime as rt
    from safety_patch.data.folder import DataFolder
    from safety_patch.evaluation.stats import proportion
    from safety_patch.gate_fit import (
        BATCHING,
        LOFO_FOLDS,
        THRESHOLD_POOL,
        GateFitConfig,
        _by_set,
        _family_out_of_fold,
        _gate_pool,
        _norm_of,
        cached_features,
        encode,
        fit_gate_probe,
        held_out_features,
        held_out_requests,
        model_layers,
        pool_features,
        reask,
        template_family,
        threshold_at_fpr,
    )
    from safety_patch.models import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="default")
    ap.add_argument("--harmful", default=f"{RESOURCES}/gate_harmful_more.tsv")
    ap.add_argument("--lookalikes", default=f"{RESOURCES}/gate_lookalike_prompts.tsv")
    ap.add_argument("--l2", type=float, default=GateFitConfig().l2)
    ap.add_argument("--extra-weight", type=float, default=GateFitConfig().extra_weight)
    ap.add_argument("--variants", default="default,+harmful,+lookalikes,+both,+both+wrapped")
    ap.add_argument("--out-name", default="gate_pool_breadth")
    args = ap.parse_args()
    threads = rt.configure_threads()
    cfg = GateFitConfig(l2=args.l2, extra_weight=args.extra_weight, written_harmful_more=False,
                        written_lookalikes=False).validate()
    d = DataFolder.of(args.data)
    lm = load_model(args.model, device="cpu")
    model, tok = lm.model, lm.tokenizer
    model.eval()
    layers = model_layers(model, cfg)
    norm = _norm_of(model, cfg)
    t0 = time.time()

    harmful, benign, counts, sources = _gate_pool(d, cfg)
    x0 = pool_features(model, tok, harmful, benign, counts, layers, BATCHING, lm.fingerprint)
    y0 = torch.tensor([1.0] * len(harmful) + [0.0] * len(benign))
    templates = d.templates("train")
    fam0 = [template_family(m[-1]["content"], templates) for m in harmful + benign]
    src0 = list(sources) + [None] * len(benign)
    x_val, sizes = held_out_features(model, tok, layers, d, "val", cfg.seed, BATCHING, lm.fingerprint)
    val = _by_set(x_val, sizes)
    x_neg = torch.cat([val[k] for k in THRESHOLD_POOL if k in val])
    names = sorted({s for s in sources if s is not None})
    loso = {s: v["direct"] for s, v in held_out_requests(d, names, "val").items()}
    loso_x = {s: cached_features(model, tok, encode(tok, v), layers, BATCHING, lm.fingerprint) for s, v in loso.items()}
    cat_of = {(r["meta"].get("source"), r["meta"].get("request")): r["meta"].get("category")
              for sp in ("train", "val") for r in d.rows(sp) if r.get("meta")}
    loso_cat = {s: [cat_of.get((s, m[0]["content"]), s) for m in v] for s, v in loso.items()}

    rng = random.Random(25)
    files = {k: read_tsv(p if (p := Path(v)).is_absolute() else ROOT / p)
             for k, v in (("harmful", args.harmful), ("lookalikes", args.lookalikes))}
    extra: dict[str, dict] = {}
    for name, rows in files.items():
        direct = [[{"role": "user", "content": q}] for _, q in rows]
        again = [[{"role": "user", "content": reask(q, rng)}] for _, q in rows]
        x = cached_features(model, tok, encode(tok, direct + again), layers, BATCHING, lm.fingerprint)
        half = torch.tensor([i % 2 for i in range(len(rows))] * 2)  # a line and its re-asking in one half
        extra[name] = {"x": x, "half": half, "n": len(rows), "cats": [c for c, _ in rows] * 2, "fam": [None] * (2 * len(rows))}
        # each line once more inside a train jailbreak template (its family recorded, so that
        # leave-one-family-out holds it out with its family): the '+wrapped' variants
        wrapped = [[{"role": "user", "content": rng.choice(templates).render(q)}] for _, q in rows]
        extra[name + "-wrapped"] = {"x": cached_features(model, tok, encode(tok, wrapped), layers, BATCHING, lm.fingerprint),
                                    "half": torch.tensor([i % 2 for i in range(len(rows))]), "n": len(rows),
                                    "cats": [c for c, _ in rows],
                                    "fam": [template_family(m[-1]["content"], templates) for m in wrapped]}
    feat_s = time.time() - t0
    print(f"features: pool {len(x0)}, val {len(x_val)}, new {sum(e['x'].shape[0] for e in extra.values())} "
          f"in {feat_s:.0f} s; layers {layers}; threads {threads}", flush=True)

    def rate(z, t):
        return proportion(int((z > t).sum()), len(z))

    def pool(use: tuple[str, ...], leave_half: int | None = None):
        """The pool's features, labels, families and sources with the files in ``use`` (without
        their lines of one half, ``leave_half``)."""
        xs, ys, fams, srcs = [x0], [y0], list(fam0), list(src0)
        for name in use:
            e = extra[name]
            keep = torch.ones(len(e["x"]), dtype=torch.bool) if leave_half is None else e["half"] != leave_half
            xs.append(e["x"][keep])
            lab = 1.0 if name.startswith("harmful") else 0.0
            ys.append(torch.full((int(keep.sum()),), lab))
            fams += [f for f, k in zip(e["fam"], keep.tolist(), strict=True) if k]
            srcs += (["written-more"] if name.startswith("harmful") else [None]) * int(keep.sum())
        return torch.cat(xs), torch.cat(ys), fams, srcs

    def product_threshold(gate, x, y, fams):
        t = threshold_at_fpr(gate.scores(x_neg), cfg.target_fpr)
        lofo = _family_out_of_fold(x, y, fams, x_neg, layers, cfg, norm, LOFO_FOLDS, cfg.seed)
        return t + lofo["raise_for_family_fpr"], lofo

    results, table = [], []
    variants = {"default": (), "+harmful": ("harmful",), "+lookalikes": ("lookalikes",), "+both": ("harmful", "lookalikes"),
                "+both+wrapped": ("harmful", "lookalikes", "harmful-wrapped", "lookalikes-wrapped"),
                "+both+wrapped-harmful": ("harmful", "lookalikes", "harmful-wrapped")}
    for label, use in variants.items():
        if label not in args.variants.split(","):
            continue
        x, y, fams, srcs = pool(use)
        gate = fit_gate_probe(x, y, layers, cfg, norm)
        t, lofo = product_threshold(gate, x, y, fams)
        z = {k: gate.scores(v) for k, v in val.items()}
        t_un = t - lofo["raise_for_family_fpr"]
        r = {"variant": label, "files": list(use), "n_harmful": int((y > 0).sum()), "n_benign": int((y == 0).sum()),
             "threshold": t, "raise": lofo["raise_for_family_fpr"],
             "val": {k: rate(v, t) for k, v in z.items()},
             "val_unraised": {k: rate(v, t_un) for k, v in z.items()},
             "out_of_family_unraised": lofo["wrapped_vs_wrapped_benign"],
             "out_of_family_at_raise_in_sample": lofo["at_family_threshold"], "loso": {}, "cross_fit": {}}
        for s in names + (["written-more"] if "harmful" in use else []):  # (its wrapped lines go with it)
            keep = torch.tensor([v != s for v in srcs])
            gs = fit_gate_probe(x[keep], y[keep], layers, cfg, norm)
            zl = gs.scores(val["borderline"])
            t5 = threshold_at_fpr(zl, 0.05)
            tp = threshold_at_fpr(gs.scores(x_neg), cfg.target_fpr)
            zs = gs.scores(loso_x[s]) if s in loso_x else gs.scores(extra["harmful"]["x"][: extra["harmful"]["n"]])
            cats = loso_cat.get(s, extra["harmful"]["cats"][: extra["harmful"]["n"]])
            by_cat = {}
            for c in sorted(set(cats)):
                idx = torch.tensor([v == c for v in cats])
                by_cat[c] = rate(zs[idx], t5)
            r["loso"][s] = {"at_5pct_lookalike_fpr": rate(zs, t5), "at_own_threshold": rate(zs, tp), "by_category": by_cat}
        # Two-fold cross-fitting of the new files: fit with one half of each file in use, score the
        # other half (as written) at that fit's product threshold; the default scores all of it unseen.
        for name in ("harmful", "lookalikes"):
            e = extra[name]
            first = e["x"][: e["n"]]
            if name not in use:
                r["cross_fit"][name] = {"unseen": rate(gate.scores(first), t),
                                        "unseen_unraised": rate(gate.scores(first), t_un)}
                continue
            fired = torch.zeros(e["n"], dtype=torch.bool)
            fired_un = torch.zeros(e["n"], dtype=torch.bool)
            for h in (0, 1):
                xh, yh, fh, _ = pool(use, leave_half=h)
                gh = fit_gate_probe(xh, yh, layers, cfg, norm)
                th, lh = product_threshold(gh, xh, yh, fh)
                rows = e["half"][: e["n"]] == h
                fired[rows] = gh.scores(first[rows]) > th
                fired_un[rows] = gh.scores(first[rows]) > th - lh["raise_for_family_fpr"]
            r["cross_fit"][name] = {"held_half": proportion(int(fired.sum()), e["n"]),
                                    "held_half_unraised": proportion(int(fired_un.sum()), e["n"])}
        results.append(r)
        v = r["val"]
        row = {"variant": label, "thr": round(t, 3), "dir%": 100 * v["harmful_direct"]["value"],
               "wrap%": 100 * v["harmful_wrapped"]["value"], "border%": 100 * v["borderline"]["value"],
               "general%": 100 * v["general"]["value"], "wrapsafe%": 100 * v["wrapped_benign"]["value"]}
        for s, lr in r["loso"].items():
            row[f"{s}@5%"] = 100 * lr["at_5pct_lookalike_fpr"]["value"]
        row["C1"] = sum(row[f"{s}@5%"] for s in ("donotanswer", "harmbench")) / 2
        for name, cf in r["cross_fit"].items():
            row[f"{name} fired%"] = 100 * next(iter(cf.values()))["value"]
        table.append(row)
        print(f"  {label}: done", flush=True)
    print_table(table)
    write(args.out_name, {"data": str(args.data), "layers": list(layers), "threads": threads,
                          "feature_seconds": round(feat_s, 1), "pool": counts,
                          "n": {"val": sizes, "loso": {s: len(v) for s, v in loso.items()},
                                **{k: e["n"] for k, e in extra.items()}},
                          "files": {k: str(v) for k, v in (("harmful", args.harmful), ("lookalikes", args.lookalikes))},
                          "table": table, "results": results}, args)


if __name__ == "__main__":
    main()
