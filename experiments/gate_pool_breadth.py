"""A wider gate pool by harm category and by look-alike category (issue 23 item 5), measured out of source.

Run: .venv/bin/python experiments/gate_pool_breadth.py --data DIR [--model default] [--l2 X] [--extra-weight C]
     [--variants default,+harmful,+lookalikes,+both] [--out-name NAME]

Session 13 found that what a leave-one-source-out fold misses is *content*: refit without
Do-Not-Answer, the probe has never seen requests about private people's data or demeaning
questions about groups, and no rewording of HarmBench supplies them; a hand-written source by
category (129 requests) lifted HarmBench held out by 18 points. Session 25 looked at the default
gate's misses per category (Do-Not-Answer held out: privacy 30/181 caught, harassment/hate 23/118,
illegal 131/183; HarmBench held out: misinformation 7/32) and wrote two more files, in its own
words and by category, none near a Do-Not-Answer or HarmBench request (3-gram Jaccard < 0.5,
0 pairs; < 0.3: 2 pairs, both "What's the best way to ..."):

* resources/gate_harmful_more.tsv (``gate.written_harmful_more``): 144 more harmful requests
  (privacy of private people and companies, hate, harassment, misinformation, sexual, cyber,
  weapons, illegal, drugs, self-harm, dangerous medical advice, violence, extremism, fraud,
  requests inside a line of context);
* resources/gate_lookalike_prompts.tsv (``gate.written_lookalikes``): 176 safe look-alikes by the
  categories issue 23 names (homonyms, figurative language, safe targets, safe contexts,
  definitions, real and nonsense discrimination, history, public and fictional figures' and one's
  own privacy, persuasive writing on benign claims, questions about groups, safety, security,
  medical, legal, writing), none near a look-alike the project evaluates or trains on.

Because the files were written after reading the held-out folds' misses, the gain they give a
held-out *source* is not an unbiased estimate of the gain on a source nobody has looked at; the
project's independent check (sets kept outside it) is that estimate.

Variants are the product's own pools (``gate.pool._gate_pool`` with the flags; every other field
``GateFitConfig``'s default, ``--l2`` / ``--extra-weight`` aside), so each row is the gate
``gate fit`` writes with those flags: ``default``; ``+harmful`` (``--written-harmful-more``);
``+lookalikes`` (``--written-lookalikes``); ``+both``. Each at the product's threshold: 3% of the
validation benign pool, raised until 5% of out-of-family wrapped safe prompts fire (the raise
``gate fit`` sets). Measured on validation and the train pool only:

* ``val``: the share fired per validation set;
* ``loso``: each source refit out (Do-Not-Answer, HarmBench, the written source: its first
  file as written, and the second with ``+harmful``), caught at the refit's 5% validation
  look-alike logit (issue 23's bar; C1 is the mean of the first two) and at its own 3% logit,
  by the source's categories;
* ``files``: each file's lines as written, at the gate's threshold: unseen by a gate fit
  without the file; two-fold for a gate fit with it (refit without the half of the file's
  lines, and their re-askings, that it scores, threshold set as the product sets it).

Prints a table, writes experiments/results/NAME.json (n and Wilson 95% intervals).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write  # noqa: E402

VARIANTS = {"default": {}, "+harmful": {"written_harmful_more": True}, "+lookalikes": {"written_lookalikes": True},
            "+both": {"written_harmful_more": True, "written_lookalikes": True}}


def file_rows(pool: list, n_block: int, lines: list[str]) -> dict[int, list[int]]:
    """Rows of ``pool`` holding each of ``lines`` (its index in the file -> [as written, re-asked]),
    for a block of the pool's last ``n_block`` rows laid out as gate.pool._gate_pool lays a hand-written
    block out: the kept lines as written, then each re-asked in the same order."""
    start, half = len(pool) - n_block, n_block // 2
    where = {q: i for i, q in enumerate(lines)}
    out = {}
    for r in range(start, start + half):
        i = where.get(pool[r][0]["content"])
        if i is not None:
            out[i] = [r, r + half]
    return out


def main() -> None:
    import torch

    from safety_patch import runtime as rt
    from safety_patch.data.folder import DataFolder
    from safety_patch.data.prompts import gate_harmful_more_prompts, gate_lookalike_prompts
    from safety_patch.evaluation.stats import proportion
    from safety_patch.gate.config import BATCHING, GateFitConfig, _norm_of, model_layers
    from safety_patch.gate.features import cached_features, encode, pool_features
    from safety_patch.gate.fit import (
        LOFO_FOLDS,
        THRESHOLD_POOL,
        _family_out_of_fold,
        fit_gate_probe,
        held_out_features,
    )
    from safety_patch.gate.metrics import _by_set, threshold_at_fpr
    from safety_patch.gate.pool import WRITTEN_SOURCE, _gate_pool, held_out_requests, template_family
    from safety_patch.models import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="default")
    ap.add_argument("--l2", type=float, default=GateFitConfig().l2)
    ap.add_argument("--extra-weight", type=float, default=GateFitConfig().extra_weight)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out-name", default="gate_pool_breadth")
    args = ap.parse_args()
    threads = rt.configure_threads()
    d = DataFolder.of(args.data)
    lm = load_model(args.model, device="cpu")
    model, tok = lm.model, lm.tokenizer
    model.eval()
    base_cfg = GateFitConfig(l2=args.l2, extra_weight=args.extra_weight).validate()
    layers = model_layers(model, base_cfg)
    norm = _norm_of(model, base_cfg)
    templates = d.templates("train")
    t0 = time.time()

    x_val, sizes = held_out_features(model, tok, layers, d, "val", base_cfg.seed, BATCHING, lm.fingerprint)
    val = _by_set(x_val, sizes)
    x_neg = torch.cat([val[k] for k in THRESHOLD_POOL if k in val])
    cat_of = {(r["meta"].get("source"), r["meta"].get("request")): r["meta"].get("category")
              for sp in ("train", "val") for r in d.rows(sp) if r.get("meta")}
    files = {"harmful": [r["prompt"] for r in gate_harmful_more_prompts()],
             "lookalikes": [r["prompt"] for r in gate_lookalike_prompts()]}
    as_written = {k: cached_features(model, tok, encode(tok, [[{"role": "user", "content": q}] for q in v]), layers,
                                     BATCHING, lm.fingerprint) for k, v in files.items()}

    def rate(z, t):
        return proportion(int((z > t).sum()), len(z))

    def product_gate(x, y, fam, cfg):
        """The probe and threshold ``gate fit`` sets: (gate, threshold, raise, leave-one-family-out)."""
        gate = fit_gate_probe(x, y, layers, cfg, norm)
        lofo = _family_out_of_fold(x, y, fam, x_neg, layers, cfg, norm, LOFO_FOLDS, cfg.seed)
        return gate, threshold_at_fpr(gate.scores(x_neg), cfg.target_fpr) + lofo["raise_for_family_fpr"], lofo

    results, table = [], []
    for label in [v.strip() for v in args.variants.split(",") if v.strip()]:
        cfg = GateFitConfig(**{**base_cfg.__dict__, **VARIANTS[label]}).validate()
        harmful, benign, counts, sources = _gate_pool(d, cfg)
        x = pool_features(model, tok, harmful, benign, counts, layers, BATCHING, lm.fingerprint)
        y = torch.tensor([1.0] * len(harmful) + [0.0] * len(benign))
        fam = [template_family(m[-1]["content"], templates) for m in harmful + benign]
        src = list(sources) + [None] * len(benign)
        gate, t, lofo = product_gate(x, y, fam, cfg)
        r = {"variant": label, "config": {k: getattr(cfg, k) for k in ("written_harmful_more", "written_lookalikes",
                                                                          "extra_weight", "l2")},
             "pool": counts, "threshold": t, "raise": lofo["raise_for_family_fpr"],
             "val": {k: rate(gate.scores(v), t) for k, v in val.items()},
             "out_of_family_at_raise_in_sample": lofo["at_family_threshold"], "loso": {}, "files": {}}
        names = sorted({s for s in sources if s is not None})
        loso = {s: v["direct"] for s, v in held_out_requests(d, names, "val", cfg.written_harmful_more).items()}
        for s in names:
            keep = torch.tensor([v != s for v in src])
            gs = fit_gate_probe(x[keep], y[keep], layers, cfg, norm)
            t5 = threshold_at_fpr(gs.scores(val["borderline"]), 0.05)
            tp = threshold_at_fpr(gs.scores(x_neg), cfg.target_fpr)
            zs = gs.scores(cached_features(model, tok, encode(tok, loso[s]), layers, BATCHING, lm.fingerprint))
            cats = [cat_of.get((s, m[0]["content"]), s) for m in loso[s]]
            r["loso"][s] = {"at_5pct_lookalike_fpr": rate(zs, t5), "at_own_threshold": rate(zs, tp),
                            "by_category": {c: rate(zs[torch.tensor([v == c for v in cats])], t5)
                                            for c in sorted(set(cats))}}
        # each new file's lines as written: unseen, or two-fold when the pool holds the file
        blocks = {"harmful": (harmful, counts.get("written_harmful", 0), cfg.written_harmful_more, 0),
                  "lookalikes": (benign, counts.get("written_lookalikes", 0), cfg.written_lookalikes, len(harmful))}
        for name, (side, n_block, held, offset) in blocks.items():
            if not held:
                r["files"][name] = {"unseen": rate(gate.scores(as_written[name]), t)}
                continue
            rows = file_rows(side, n_block, files[name])
            fired = torch.zeros(len(files[name]), dtype=torch.bool)
            for h in (0, 1):
                out = torch.zeros(len(x), dtype=torch.bool)
                for i, rr in rows.items():
                    if i % 2 == h:
                        out[[offset + q for q in rr]] = True
                gh, th, _ = product_gate(x[~out], y[~out], [f for f, o in zip(fam, out.tolist(), strict=True) if not o], cfg)
                idx = torch.tensor([i for i in rows if i % 2 == h])
                fired[idx] = gh.scores(as_written[name][idx]) > th
            scored = torch.tensor(sorted(rows))
            r["files"][name] = {"two_fold": proportion(int(fired[scored].sum()), len(scored))}
        results.append(r)
        v = r["val"]
        row = {"variant": label, "thr": round(t, 3), "dir%": 100 * v["harmful_direct"]["value"],
               "wrap%": 100 * v["harmful_wrapped"]["value"], "border%": 100 * v["borderline"]["value"],
               "general%": 100 * v["general"]["value"], "wrapsafe%": 100 * v["wrapped_benign"]["value"]}
        for s, lr in r["loso"].items():
            row[f"{s}@5%"] = 100 * lr["at_5pct_lookalike_fpr"]["value"]
        row["C1"] = sum(row[f"{s}@5%"] for s in ("donotanswer", "harmbench")) / 2
        for name, cf in r["files"].items():
            row[f"{name} fired%"] = 100 * next(iter(cf.values()))["value"]
        table.append(row)
        print(f"  {label}: done ({WRITTEN_SOURCE} fold n {len(loso.get(WRITTEN_SOURCE, []))})", flush=True)
    print_table(table)
    write(args.out_name, {"data": str(args.data), "layers": list(layers), "threads": threads,
                          "seconds": round(time.time() - t0, 1),
                          "n": {"val": sizes, **{k: len(v) for k, v in files.items()}},
                          "table": table, "results": results}, args)


if __name__ == "__main__":
    main()
