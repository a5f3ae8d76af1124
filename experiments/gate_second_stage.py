"""A probe read after the base model's first k answer tokens, vs the prompt-only gate (issue 23 item 3).

Run: .venv/bin/python experiments/gate_second_stage.py --data DIR [--k 1,2,4,8] [--target-fpr 0.03]
     [--limit N]

SafeSwitch (Han et al., arXiv 2502.01042) reads the model's internal state after it has decoded
a few tokens of its answer: what the model is *about to say* can be easier to read than what it
was asked. This study measures that signal for our gate. One greedy generation pass of the base
model over every prompt (``k_max + 1`` forward calls, EOS suppressed so that every row has k_max
answer tokens) captures the residual state after the gate's layer at the last position of each
call: call 0 is the prompt's last token (the shipped gate's feature), call j the j-th answer
token. Candidates, each a logistic probe fit as ``gate.fit.fit_gate_probe`` fits the shipped one
(final-norm features, class-balanced, the default L2) on the default gate pool (harmful vs
benign prompts: the same labels):

* ``prompt``: call 0 (the shipped gate, re-read in this pass so every candidate shares its numerics);
* ``answer@k``: call k alone;
* ``prompt+answer@k``: both, concatenated (standardised per half).

Measured on the **validation** split only, as experiments/gate_candidates.py does: threshold at
``--target-fpr`` on the validation benign pool; share fired per validation set; leave-one-source-out
(refit without each harmful source, caught share of its direct requests at the logit where 5% of
validation look-alikes fire). The rule attacks are left out (their cost; the first criterion is
leave-one-source-out).

The SafeSwitch *second stage* proper (route to the refusal adapter only where the prompt looks
harmful *and* a probe says the base would comply) can change no answer's refusal on its own: it
only withholds the adapter where the base would refuse anyway; its ceiling is the base's own
refusal share on each set (experiments/default_targets.py measures it; docs/lab-notebook.md,
session 14), so this script does not fit it.

Prints a table, writes experiments/results/gate_second_stage.json (n and 95% intervals per figure).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write  # noqa: E402


def answer_states(model, tokenizer, prompts, layer: int, k_max: int, token_budget: int = 12288,
                  max_batch: int = 32):
    """Residual state after decoder layer ``layer`` at the last position of each of the
    ``k_max + 1`` forward calls of a greedy generation: [n, k_max + 1, hidden] fp32, call 0 the
    prompt's last token. Also the greedy answer ids [n, k_max + 1]."""
    import torch

    from safety_patch.gate.features import length_buckets
    from safety_patch.gate.probe import decoder_layers
    from safety_patch.progress import bar
    from safety_patch.prompt_pass import left_padded

    block = decoder_layers(model)[layer]
    dim = model.config.hidden_size
    out = torch.zeros(len(prompts), k_max + 1, dim)
    ids_out = torch.zeros(len(prompts), k_max + 1, dtype=torch.long)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    calls: list = []
    h = block.register_forward_hook(lambda _m, _i, o: calls.append((o[0] if isinstance(o, tuple) else o)[:, -1].float()))
    try:
        with torch.inference_mode(), bar(len(prompts), f"[answer] layer {layer}, {k_max} tokens", unit="prompt") as b:
            for idx in length_buckets([len(p) for p in prompts], token_budget, max_batch):
                x, mask = left_padded([prompts[i] for i in idx], pad)
                width = x.shape[1]
                calls.clear()
                g = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=k_max + 1,
                                   min_new_tokens=k_max + 1, do_sample=False, pad_token_id=pad)
                assert len(calls) == k_max + 1, len(calls)
                out[idx] = torch.stack(calls, 1)
                ids_out[idx] = g[:, width:]
                b.update(len(idx))
    finally:
        h.remove()
    return out, ids_out


def main() -> None:
    import torch

    from safety_patch import runtime as rt
    from safety_patch.data.folder import DataFolder
    from safety_patch.evaluation.stats import proportion
    from safety_patch.gate.config import GateFitConfig, _norm_of
    from safety_patch.gate.features import encode
    from safety_patch.gate.fit import fit_gate_probe
    from safety_patch.gate.metrics import _auroc_ci, threshold_at_fpr
    from safety_patch.gate.pool import HELD_OUT_SETS, _gate_pool, held_out_prompts, held_out_requests
    from safety_patch.models import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="default")
    ap.add_argument("--k", default="1,2,4,8", help="answer positions to read (comma-separated)")
    ap.add_argument("--target-fpr", type=float, default=GateFitConfig().target_fpr)
    ap.add_argument("--limit", type=int, default=None, help="a random subsample of every set (a dry run)")
    ap.add_argument("--out-name", default="gate_second_stage")
    args = ap.parse_args()
    threads = rt.configure_threads()
    ks = sorted({int(k) for k in args.k.split(",")})
    cfg = GateFitConfig().validate()
    d = DataFolder.of(args.data)
    lm = load_model(args.model, device="cpu")
    tok = lm.tokenizer
    lm.model.eval()
    layer = cfg.resolved_layer(lm.model.config.num_hidden_layers)
    norm = _norm_of(lm.model, cfg)

    harmful, benign, counts, sources = _gate_pool(d, cfg)
    held = held_out_prompts(d, "val", cfg.seed)
    src_names = sorted({s for s in sources if s is not None})
    loso = {s: v["direct"] for s, v in held_out_requests(d, src_names, "val").items()}
    if args.limit:
        import random

        rng = random.Random(0)

        def some(n):
            return sorted(rng.sample(range(n), min(args.limit, n)))

        ih, ib = some(len(harmful)), some(len(benign))
        harmful, sources, benign = [harmful[i] for i in ih], [sources[i] for i in ih], [benign[i] for i in ib]
        held = {k: [v[i] for i in some(len(v))] for k, v in held.items()}
        loso = {k: [v[i] for i in some(len(v))] for k, v in loso.items()}
    names_val = [k for k in HELD_OUT_SETS if held[k]]
    groups = {"pool_harmful": harmful, "pool_benign": benign, **{f"val:{k}": held[k] for k in names_val},
              **{f"loso:{s}": v for s, v in loso.items()}}
    # every distinct conversation is read once
    uniq: dict[str, int] = {}
    convs = []
    for v in groups.values():
        for m in v:
            if repr(m) not in uniq:
                uniq[repr(m)] = len(convs)
                convs.append(m)
    t0 = time.time()
    states, answers = answer_states(lm.model, tok, encode(tok, convs), layer, max(ks))
    feat_s = time.time() - t0
    print(f"states: {len(convs)} distinct prompts, calls 0..{max(ks)}, layer {layer}, {feat_s:.0f} s, "
          f"threads {threads}", flush=True)
    g = {k: states[[uniq[repr(m)] for m in v]] for k, v in groups.items()}
    y = torch.tensor([1.0] * len(harmful) + [0.0] * len(benign))
    src = list(sources) + [None] * len(benign)

    def feats(x: torch.Tensor, cand: tuple[int, ...]) -> torch.Tensor:
        return torch.cat([x[:, c] for c in cand], 1)

    def fit(x, yy, cand):
        # A concatenation is fit as one probe on [prompt state, answer state]: the final-norm
        # reading (gate.config._norm_of) applies per model state, so each half is normed here and
        # the probe fit on the normed halves as a standardised probe with intercept (norm {}).
        if len(cand) == 1:
            return fit_gate_probe(x, yy, layer, cfg, norm), None
        return fit_gate_probe(normed(x, len(cand)), yy, layer, cfg, {}), len(cand)

    def normed(x, parts):
        if not norm:
            return x
        dim = x.shape[1] // parts
        w, eps = norm["norm_weight"], norm["norm_eps"]
        return torch.cat([h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w
                          for h in (x[:, i * dim:(i + 1) * dim] for i in range(parts))], 1)

    def score(gate, parts, x):
        return gate.scores(x if parts is None else normed(x, parts))

    def rate(z, t):
        return proportion(int((z > t).sum()), len(z))

    x_pool = torch.cat([g["pool_harmful"], g["pool_benign"]])
    cands = [("prompt", (0,))] + [(f"answer@{k}", (k,)) for k in ks] + [(f"prompt+answer@{k}", (0, k)) for k in ks]
    results, table = [], []
    for name, cand in cands:
        gate, parts = fit(feats(x_pool, cand), y, cand)
        z = {k: score(gate, parts, feats(v, cand)) for k, v in g.items() if not k.startswith("pool")}
        pool = torch.cat([z["val:borderline"], z["val:general"], z["val:wrapped_benign"]])
        t = threshold_at_fpr(pool, args.target_fpr)
        r = {"candidate": name, "calls": list(cand), "threshold": t,
             "auroc_direct": _auroc_ci(z["val:harmful_direct"].tolist(),
                                       torch.cat([z["val:borderline"], z["val:general"]]).tolist()),
             "auroc_wrapped": _auroc_ci(z["val:harmful_wrapped"].tolist(), z["val:wrapped_benign"].tolist()),
             "fired": {k.split(":", 1)[1]: rate(v, t) for k, v in z.items() if k.startswith("val:")}, "loso": {}}
        for s in src_names:
            keep = torch.tensor([v != s for v in src])
            gs, ps = fit(feats(x_pool, cand)[keep], y[keep], cand)
            zb = score(gs, ps, feats(g["val:borderline"], cand))
            zs = score(gs, ps, feats(g[f"loso:{s}"], cand))
            tb = threshold_at_fpr(zb, 0.05)
            r["loso"][s] = {"caught_direct_at_5pct_lookalike_fpr": rate(zs, tb),
                            "auroc_direct": _auroc_ci(zs.tolist(), torch.cat(
                                [zb, score(gs, ps, feats(g["val:general"], cand))]).tolist())}
        c1 = sum(v["caught_direct_at_5pct_lookalike_fpr"]["value"] for v in r["loso"].values()) / len(r["loso"])
        r["c1_mean_loso_caught"] = c1
        results.append(r)
        f = r["fired"]
        pct = lambda p: f"{100 * p['value']:.1f}"  # noqa: E731
        table.append({"candidate": name, "C1 (mean LOSO caught)": f"{100 * c1:.1f}",
                      **{f"LOSO {s}": pct(v["caught_direct_at_5pct_lookalike_fpr"]) for s, v in r["loso"].items()},
                      "AUROC direct": f"{r['auroc_direct']['value']:.3f}",
                      "AUROC wrapped": f"{r['auroc_wrapped']['value']:.3f}",
                      "direct caught": pct(f["harmful_direct"]), "wrapped caught": pct(f["harmful_wrapped"]),
                      "look-alikes fired": pct(f["borderline"]), "wrapped safe fired": pct(f["wrapped_benign"])})
    print_table(table)
    n = {k: len(v) for k, v in groups.items()}
    sample = [{"prompt": convs[i][-1]["content"][:120], "answer": tok.decode(answers[i])}
              for i in range(0, len(convs), max(1, len(convs) // 12))]
    write(args.out_name, {"layer": layer, "k": ks, "n": n, "counts": counts, "feature_seconds": feat_s,
                          "threads": threads, "results": results, "answer_samples": sample}, args)


if __name__ == "__main__":
    main()
