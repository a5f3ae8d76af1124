"""Gate candidates side by side, chosen on validation only (issue 23 item 3).

Run: .venv/bin/python experiments/gate_candidates.py --data DIR [--model default] [--layers 12,15,18,21]
     [--target-fpr 0.05] [--features-cache FILE]

One forward pass per prompt (stopped after the deepest layer asked for) records, at each layer,
the hidden state at the last prompt token and its mean over the prompt's own tokens (from the
first token where prompts differ, i.e. after the shared system prefix, to the end of the
assistant header). Every candidate is fit on the default gate's train pool
(``gate.pool._gate_pool`` with ``GateFitConfig()``) and measured on the **validation** split only:

* ``val``: AUROC direct harmful vs borderline + general, wrapped harmful vs wrapped benign; the
  threshold set at ``--target-fpr`` on the validation benign pool (borderline + general +
  wrapped benign, as ``gate fit --target-fpr``); the share fired on per set at that threshold;
* ``attacks``: the rule attacks the train split never used (``gate.pool.unseen_attacks``) on the
  validation direct requests (caught) and on the validation benign prompts (cleaned controls);
* ``loso``: leave-one-source-out, as ``gate.crossfit.leave_one_source_out``: refit without each harmful
  source, threshold at ``--target-fpr`` on the validation benign pool, caught share of that
  source's direct requests (train + val, never seen) and wrapped val rows; and the caught share
  at the logit where 5% of the validation *borderline* (safe look-alike) prompts fire, the bar
  issue 23 sets (>= 90% at <= 5% look-alike false positives).

Candidates: the logistic probe (gate.fit_probe, the shipped form) on last-token states of one
layer (residual and final-norm), on mean-pooled states, on both, on several layers
concatenated, and a small MLP (one hidden layer of 128, weight decay) on the same inputs.
Prints a table and writes experiments/results/gate_candidates.json (n and 95% intervals per figure).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write  # noqa: E402


def pooled_states(model, tokenizer, prompts, layers, start: int, batch_size: int = 8, progress=None):
    """{layer: (last [n, h], mean [n, h])}: each prompt's state at its last token and its mean over
    tokens ``start:`` (left padding and the shared prefix excluded). Forward stops after max(layers)."""
    import torch

    from safety_patch.gate.probe import _Stop, decoder_layers

    blocks = decoder_layers(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    h = model.config.hidden_size
    last = {li: torch.zeros(len(prompts), h) for li in layers}
    mean = {li: torch.zeros(len(prompts), h) for li in layers}
    cap: dict[int, torch.Tensor] = {}
    deepest = max(layers)

    def hook_for(i):
        def hook(_m, _inp, out):
            cap[i] = (out[0] if isinstance(out, tuple) else out).float()
            if i == deepest:
                raise _Stop
        return hook

    handles = [blocks[i].register_forward_hook(hook_for(i)) for i in layers]
    try:
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            width = max(len(prompts[i]) for i in idx)
            ids = torch.full((len(idx), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            own = torch.zeros(len(idx), width)
            for r, i in enumerate(idx):
                n = len(prompts[i])
                ids[r, width - n :] = torch.tensor(prompts[i])
                mask[r, width - n :] = 1
                own[r, width - n + min(start, n - 1) :] = 1
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            cap.clear()
            with torch.inference_mode():
                try:
                    model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
                except _Stop:
                    pass
            for li in layers:
                st = cap[li]
                last[li][idx] = st[:, -1]
                mean[li][idx] = (st * own[..., None]).sum(1) / own.sum(1, keepdim=True)
            if progress is not None:
                progress(len(idx))
    finally:
        for hd in handles:
            hd.remove()
    return {li: (last[li], mean[li]) for li in layers}


def fit_mlp(x, y, hidden: int = 128, weight_decay: float = 1e-2, steps: int = 400, seed: int = 0):
    """A one-hidden-layer MLP (GELU) on standardised features, class-balanced BCE, AdamW full batch.
    Returns a scoring function [n, d] -> logits [n]."""
    import torch

    torch.manual_seed(seed)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1))
    pos = float(y.mean())
    w = torch.where(y > 0, 0.5 / pos, 0.5 / (1 - pos))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, weight_decay=weight_decay)
    z = (x - mu) / sd
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(net(z).squeeze(-1), y, weight=w)
        loss.backward()
        opt.step()
    net.eval()
    return lambda v: net((v - mu) / sd).squeeze(-1).detach()


def fit_logistic(x, y, l2: float, intercept: bool = True):
    from safety_patch.gate.probe import fit_probe

    w, b, mu, sd = fit_probe(x, y, l2, intercept=intercept)
    return lambda v: ((v - mu) / sd) @ w + b


def main() -> None:
    import torch

    from safety_patch import runtime as rt
    from safety_patch.data.folder import DataFolder
    from safety_patch.evaluation.stats import proportion
    from safety_patch.gate.config import GateFitConfig
    from safety_patch.gate.features import encode
    from safety_patch.gate.metrics import _auroc_ci, threshold_at_fpr
    from safety_patch.gate.pool import (
        _gate_pool,
        attack_prompts,
        held_out_prompts,
        held_out_requests,
        unseen_attacks,
    )
    from safety_patch.models import load_model
    from safety_patch.progress import bar

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="default")
    ap.add_argument("--layers", default="12,15,18,21")
    ap.add_argument("--target-fpr", type=float, default=0.05)
    ap.add_argument("--features-cache", default=None, help="save/reuse the feature pass here (.pt)")
    ap.add_argument("--out-name", default="gate_candidates", help="experiments/results/NAME.json")
    ap.add_argument("--rephrased", type=int, default=0,
                    help="also fit the '+rephrased' candidates: the pool plus N re-asked requests per side (gate.rephrased)")
    ap.add_argument("--self-instruct", type=int, default=None, help="gate.self_instruct (default: the default gate's)")
    args = ap.parse_args()
    threads = rt.configure_threads()
    layers = [int(v) for v in args.layers.split(",")]
    cfg = GateFitConfig(**({} if args.self_instruct is None else {"self_instruct": args.self_instruct}),
                        rephrased=args.rephrased)
    d = DataFolder.of(args.data)
    lm = load_model(args.model, device="cpu")
    tok = lm.tokenizer

    harmful, benign, counts, sources = _gate_pool(d, cfg)
    held = held_out_prompts(d, "val", cfg.seed)
    attacks = unseen_attacks(d)
    att = attack_prompts(d, "val", attacks)
    names = sorted({s for s in sources if s is not None})
    loso_pos = held_out_requests(d, names, "val")

    # every prompt once: (messages, prefill)
    groups: dict[str, list] = {"pool_harmful": [(m, "") for m in harmful], "pool_benign": [(m, "") for m in benign]}
    groups |= {f"val:{k}": [(m, "") for m in v] for k, v in held.items()}
    groups |= {f"att:{a}:{k}": v for a, s in att.items() for k, v in s.items()}
    groups |= {f"loso:{s}:{k}": [(m, "") for m in v] for s, kv in loso_pos.items() for k, v in kv.items()}
    flat = [it for v in groups.values() for it in v]
    ids = encode(tok, [m for m, _ in flat])  # the gate reads the prompt before any prefill, as routing does
    key = {}
    uniq = []
    for t in ids:
        if tuple(t) not in key:
            key[tuple(t)] = len(uniq)
            uniq.append(t)
    # the shared prefix (system prompt and first header): mean pooling starts after it
    start = 0
    while all(len(t) > start + 1 and t[start] == uniq[0][start] for t in uniq):
        start += 1
    print(f"{len(flat)} prompts, {len(uniq)} unique; layers {layers}; mean pooling from token {start}; threads {threads}",
          flush=True)
    t0 = time.time()
    cache = Path(args.features_cache) if args.features_cache else None
    if cache and cache.is_file():
        st = torch.load(cache)
        assert st["n"] == len(uniq) and st["layers"] == layers and st["start"] == start, "stale features cache"
        states = st["states"]
    else:
        lm.model.eval()
        with bar(len(uniq), "[bench] pooled states", unit="prompt") as b:
            states = pooled_states(lm.model, tok, uniq, layers, start, progress=b.update)
        if cache:
            torch.save({"n": len(uniq), "layers": layers, "start": start, "states": states}, cache)
    feat_s = time.time() - t0
    rows_of, at = {}, 0
    for g, v in groups.items():
        rows_of[g] = torch.tensor([key[tuple(ids[at + i])] for i in range(len(v))], dtype=torch.long)
        at += len(v)

    from safety_patch.gate.config import _norm_of

    norm = _norm_of(lm.model, GateFitConfig(features="final-norm"))

    def final_norm(x):
        v = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm["norm_eps"])
        return v * norm["norm_weight"]

    mid = 18 if 18 in layers else layers[len(layers) // 2]
    others = [li for li in layers if li != mid]
    spread = sorted({layers[0], mid, layers[-1]})
    cands = {
        f"last@{mid} (shipped)": (lambda: states[mid][0], "logistic"),
        f"last@{mid} final-norm": (lambda: final_norm(states[mid][0]), "logistic-no-intercept"),
        **{f"last@{li}": ((lambda li=li: states[li][0]), "logistic") for li in others},
        f"mean@{mid}": (lambda: states[mid][1], "logistic"),
        f"last+mean@{mid}": (lambda: torch.cat([states[mid][0], states[mid][1]], 1), "logistic"),
        f"last@{'+'.join(map(str, spread))}": (lambda: torch.cat([states[li][0] for li in spread], 1), "logistic"),
        f"mean@{'+'.join(map(str, spread))}": (lambda: torch.cat([states[li][1] for li in spread], 1), "logistic"),
        f"MLP last@{mid}": (lambda: states[mid][0], "mlp"),
        f"MLP last+mean@{mid}": (lambda: torch.cat([states[mid][0], states[mid][1]], 1), "mlp"),
    }

    def fit(kind, x, y):
        if kind == "mlp":
            return fit_mlp(x, y)
        return fit_logistic(x, y, cfg.l2, intercept=kind != "logistic-no-intercept")

    def rate(z, t):
        return proportion(int((z > t).sum()), len(z))

    pool_src = list(sources) + [None] * len(benign)
    y = torch.tensor([1.0] * len(harmful) + [0.0] * len(benign))
    # the re-asked prompts come last on each side (gate.pool._gate_pool); only '+rephrased' candidates train on them
    n_rh, n_rb = counts.get("rephrased_harmful", 0), counts.get("rephrased_benign", 0)
    is_re = torch.tensor([i >= len(harmful) - n_rh for i in range(len(harmful))]
                         + [i >= len(benign) - n_rb for i in range(len(benign))])
    if n_rh:
        for name in list(cands):
            if name.startswith(f"last@{mid} (shipped)") or name.startswith(f"last@{mid} final-norm") \
                    or name.startswith(f"last+mean@{mid}"):
                cands[f"{name.split(' (')[0]} +rephrased"] = cands[name]
    results, table = {}, []
    for name, (feat, kind) in cands.items():
        X = feat()
        g = {k: X[v] for k, v in rows_of.items()}
        x_train = torch.cat([g["pool_harmful"], g["pool_benign"]])
        use = torch.ones(len(y), dtype=torch.bool) if name.endswith("+rephrased") else ~is_re
        score = fit(kind, x_train[use], y[use])
        z = {k: score(v) for k, v in g.items()}
        pool = torch.cat([z["val:borderline"], z["val:general"], z["val:wrapped_benign"]])
        t = threshold_at_fpr(pool, args.target_fpr)
        r = {"kind": kind, "threshold": t,
             "val": {"auroc_direct": _auroc_ci(z["val:harmful_direct"].tolist(),
                                               torch.cat([z["val:borderline"], z["val:general"]]).tolist()),
                     "auroc_wrapped": _auroc_ci(z["val:harmful_wrapped"].tolist(), z["val:wrapped_benign"].tolist()),
                     "fired": {k.split(":", 1)[1]: rate(v, t) for k, v in z.items() if k.startswith("val:")}},
             "attacks": {a: {"caught": rate(z[f"att:{a}:harmful"], t), "fired_on_benign": rate(z[f"att:{a}:benign"], t)}
                         for a in attacks},
             "loso": {}}
        for s in names:
            keep = torch.tensor([v != s for v in pool_src]) & use
            sc = fit(kind, x_train[keep], y[keep])
            zs = {k: sc(g[k]) for k in ("val:borderline", "val:general", "val:wrapped_benign",
                                         f"loso:{s}:direct", f"loso:{s}:wrapped")}
            ts = threshold_at_fpr(torch.cat([zs["val:borderline"], zs["val:general"], zs["val:wrapped_benign"]]),
                                  args.target_fpr)
            tb = threshold_at_fpr(zs["val:borderline"], 0.05)
            r["loso"][s] = {"threshold": ts, "caught_direct": rate(zs[f"loso:{s}:direct"], ts),
                            "caught_wrapped": rate(zs[f"loso:{s}:wrapped"], ts),
                            "auroc_direct": _auroc_ci(zs[f"loso:{s}:direct"].tolist(),
                                                      torch.cat([zs["val:borderline"], zs["val:general"]]).tolist()),
                            "caught_direct_at_5pct_lookalike_fpr": rate(zs[f"loso:{s}:direct"], tb)}
        results[name] = r
        f = r["val"]["fired"]
        row = {"candidate": name, "AUROC dir": r["val"]["auroc_direct"]["value"],
               "AUROC wrap": r["val"]["auroc_wrapped"]["value"],
               "dir%": 100 * f["harmful_direct"]["value"], "wrap%": 100 * f["harmful_wrapped"]["value"],
               "border%": 100 * f["borderline"]["value"], "wrapsafe%": 100 * f["wrapped_benign"]["value"],
               "attacks caught%": 100 * sum(a["caught"]["value"] for a in r["attacks"].values()) / max(1, len(attacks)),
               "attacks benign%": 100 * sum(a["fired_on_benign"]["value"] for a in r["attacks"].values()) / max(1, len(attacks))}
        for s in names:
            row[f"LOSO {s}%"] = 100 * r["loso"][s]["caught_direct"]["value"]
            row[f"LOSO {s}@5%look%"] = 100 * r["loso"][s]["caught_direct_at_5pct_lookalike_fpr"]["value"]
        table.append(row)
        print(f"  {name}: done", flush=True)
    print_table(table)
    n = {k: len(v) for k, v in groups.items()}
    write(args.out_name, {"data": str(args.data), "data_manifest_seed": d.manifest.get("seed"), "layers": layers,
                              "mean_from_token": start, "target_fpr": args.target_fpr, "attacks": attacks,
                              "feature_seconds": round(feat_s, 1), "threads": threads, "n": n, "pool": counts,
                              "table": table, "candidates": results}, args)


if __name__ == "__main__":
    main()
