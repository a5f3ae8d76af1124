"""``gate eval``: a gate's reliability report on a data folder's held-out split (direct and
wrapped harmful vs benign, the crossfits, rule attacks it never trained on, the user's own
prompt files) and the table the CLI prints and the ``reproduce`` report embeds."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import SafetyPatchError
from ..evaluation.stats import FEW_NEGATIVES_NOTE, few_negatives, tpr_at_fpr_text
from .config import BATCHING, Batching
from .crossfit import leave_one_family_out, leave_one_source_out, lookalike_report
from .features import FeatureBank, _read, check_context, encode
from .fit import attack_scores, held_out_scores
from .folder import GATE_BOUND_FIELDS, GATE_JSON, read_gate_source, recorded_config
from .metrics import attack_report, discrimination, reliability, tpr_at_fpr_bootstrap
from .pool import _gate_pool, attack_prompts, unseen_attacks
from .probe import Gate


def user_prompt_sets(harmful: str | Path | None = None, benign: str | Path | None = None) -> dict[str, dict]:
    """A user's own prompt files for :func:`evaluate_gate`, read and checked before any model
    loads: ``{"harmful"|"benign": {"file", "sha256", "prompts": [[user turn]], "categories"}}``.
    Each file is JSONL or CSV with a ``prompt`` (or ``goal``) column and an optional
    ``category`` (the format `eval safety --prompts` reads; AdvBench's CSV works as is).
    Raises SafetyPatchError naming the file and line of a bad row, an empty file, or a prompt in both files."""
    from ..atomic import sha256_file
    from ..evaluation.prompts import benign_prompts, harmful_requests

    out: dict[str, dict] = {}
    if harmful is not None:
        reqs, _ = harmful_requests(harmful)
        out["harmful"] = {"file": str(harmful), "sha256": sha256_file(harmful),
                          "prompts": [[{"role": "user", "content": r["request"]}] for r in reqs],
                          # the file's own category, not the unified one eval safety groups by: a user
                          # asking which of their categories the gate misses means theirs
                          "categories": [r.get("raw_category") or r["category"] or "user" for r in reqs]}
    if benign is not None:
        rows = benign_prompts(benign)
        out["benign"] = {"file": str(benign), "sha256": sha256_file(benign), "prompts": [r["messages"] for r in rows],
                         "categories": [r["category"] for r in rows]}
    if len(out) == 2:  # one prompt labelled both ways: every AUROC and rate over the pair would be meaningless
        from ..textsim import normalise

        harm = {normalise(m[-1]["content"]) for m in out["harmful"]["prompts"]}
        both = [m[-1]["content"] for m in out["benign"]["prompts"] if normalise(m[-1]["content"]) in harm]
        if both:
            raise SafetyPatchError(f"{len(both)} prompt(s) are in both --harmful {harmful} and --benign {benign} "
                                   f"(e.g. {both[0][:80]!r}): a prompt is one or the other; fix the labels")
    return out


def user_prompt_report(model, tokenizer, gate: Gate, sets: dict[str, dict], batching: Batching = BATCHING,
                       fingerprint: str | None = None, bank: FeatureBank | None = None,
                       fit_on: set[str] | None = None) -> dict:
    """The gate on a user's own prompts (:func:`user_prompt_sets`): per file the share it fires on
    (``caught`` for harmful, ``fired`` for benign: each a safe prompt sent to the refusal adapter),
    overall and by category (Wilson 95% intervals), with the prompts it missed / fired on; with
    both files, :func:`discrimination` of one against the other (AUROC, TPR at 1%/5% FPR on the
    user's benign prompts, TPR/FPR at the gate's threshold). The out-of-source check the project's
    own splits cannot give (docs/gate.md). ``fit_on``: the gate's training pool (``textsim.normalise``d
    last user turns); prompts in it are counted (``in_training_pool``) and the rate is given again
    without them (``<rate>_outside_pool``; with both files, ``harmful_vs_benign_outside_pool`` too):
    a prompt the gate learnt from says nothing of prompts it has not seen (a user's trial passed the
    data build's own source file and read 84.6% caught for a mostly in-sample figure)."""
    from ..evaluation.stats import proportion
    from ..textsim import normalise

    out: dict[str, Any] = {}
    z: dict[str, torch.Tensor] = {}
    unseen_z: dict[str, torch.Tensor] = {}  # the logits of prompts outside the pool
    for kind, name in (("harmful", "caught"), ("benign", "fired")):
        if kind not in sets:
            continue
        u = sets[kind]
        ids = encode(tokenizer, u["prompts"])
        check_context(model, ids, u["file"])
        z[kind] = gate.scores(_read(model, tokenizer, ids, gate.layers, batching, fingerprint, bank))
        fires = (z[kind] > gate.threshold).tolist()
        by: dict[str, list[int]] = {}
        for c, f in zip(u["categories"], fires, strict=True):
            k = by.setdefault(c, [0, 0])
            k[0] += int(f)
            k[1] += 1
        listed = [m[-1]["content"] for m, f in zip(u["prompts"], fires, strict=True) if f != (kind == "harmful")]
        out[kind] = {"file": u["file"], "sha256": u["sha256"], name: proportion(sum(fires), len(fires)),
                     "by_category": {c: proportion(k, n) for c, (k, n) in sorted(by.items())},
                     ("missed_prompts" if kind == "harmful" else "fired_prompts"): listed}
        if fit_on is not None:
            seen = [normalise(m[-1]["content"]) in fit_on for m in u["prompts"]]
            unseen = [f for f, s_ in zip(fires, seen, strict=True) if not s_]
            out[kind] |= {"in_training_pool": sum(seen),
                          "in_training_pool_prompts": [m[-1]["content"] for m, s_ in zip(u["prompts"], seen, strict=True) if s_],
                          f"{name}_outside_pool": proportion(sum(unseen), len(unseen))}
            unseen_z[kind] = z[kind][~torch.tensor(seen, dtype=torch.bool)]
    if len(z) == 2:
        out["harmful_vs_benign"] = discrimination(z["harmful"], z["benign"], gate.threshold)
        if len(unseen_z) == 2 and any(out[k]["in_training_pool"] for k in z):
            # the AUROC too mixes in prompts the gate learnt from: give it again without them
            out["harmful_vs_benign_outside_pool"] = discrimination(unseen_z["harmful"], unseen_z["benign"],
                                                                   gate.threshold)
    return out


def evaluate_gate(lm, gate_dir: str | Path, data_dir: str | Path, split: str = "val", seed: int = 0,
                  batching: Batching = BATCHING, loso: bool = False,
                  attacks: Sequence[str] | None = None, lofo: bool = False,
                  user_sets: dict[str, dict] | None = None, shots: Sequence[int] = ()) -> dict:
    """``safety-patch gate eval``: the gate's reliability report on one held-out split; with
    ``loso``, also :func:`leave_one_source_out` with the gate's own config (refits: it costs
    about one gate fit); with ``lofo``, also :func:`leave_one_family_out` (five refits on the
    pool's features, which a fit has cached). ``attacks``: rule attacks run on the split's direct harmful requests and
    on its benign prompts (:func:`attack_prompts`); None = those the train split never used
    (:func:`unseen_attacks`), ``[]`` = none. ``user_sets``: the user's own prompt files
    (:func:`user_prompt_sets`), reported as ``user_prompts`` (:func:`user_prompt_report`).
    ``shots``: with ``loso``, each fold's learning curve (:func:`leave_one_source_out`'s ``shots``).

    Refuses (SafetyPatchError) a gate fit on another base than ``lm``."""
    from ..data.build import manifest_sha256
    from ..provenance import provenance

    if shots and not loso:
        raise SafetyPatchError("shots (--source-shots) put a held-out source's requests back into a "
                               "leave-one-source-out refit: give --leave-one-source-out too")
    gate, gmeta, where = read_gate_source(gate_dir)
    if gmeta["base"]["fingerprint"] != lm.fingerprint:
        raise SafetyPatchError(f"{where}: the gate was fit on base {gmeta['base']['fingerprint'][:12]}…, "
                               f"the model is {lm.fingerprint[:12]}…")
    t0 = time.time()
    # Every list below is read through one bank: the lists overlap, and a prompt is read once.
    bank = FeatureBank(lm.model, lm.tokenizer, gate.layers, batching, lm.fingerprint)
    scores, sizes = held_out_scores(lm.model, lm.tokenizer, gate, data_dir, split, seed, batching, lm.fingerprint, bank)
    rep = reliability(scores, gate.threshold)
    if len(scores.get("harmful_direct", ())) and len(scores.get("borderline", ())):
        # the bar leave-one-source-out folds are held to (look-alikes alone as negatives), in
        # source: what a fold's figure is compared with
        la = discrimination(scores["harmful_direct"], scores["borderline"], gate.threshold)
        la["tpr_at_fpr_0.05"]["ci95_with_threshold"] = tpr_at_fpr_bootstrap(scores["harmful_direct"],
                                                                            scores["borderline"], 0.05)
        rep["direct_vs_lookalikes"] = la
    attacks = unseen_attacks(data_dir) if attacks is None else list(attacks)
    if attacks:
        sets = attack_prompts(data_dir, split, attacks)
        rep["attacks"] = attack_report(attack_scores(lm.model, lm.tokenizer, gate, sets, batching, lm.fingerprint, bank),
                                       gate.threshold)
    cfg = recorded_config(gmeta, gate, str(where))
    # Refits (the look-alike cross-fit, leave one source / family out) draw the gate's pool from
    # data_dir: on another folder than the gate's own they fit another gate than the file.
    fit_on = (gmeta.get("data") or {}).get("manifest_sha256")
    other_data = fit_on is not None and fit_on != manifest_sha256(data_dir)
    if user_sets:
        from ..data.folder import DataFolder
        from ..evaluation.prompts import train_split_texts
        from ..textsim import normalise

        # the pool the gate's config draws from data_dir (the gate's own when the folder is, a gate
        # like it otherwise: said in the note), hand-written files included, and the train split's
        # bare requests (one the gate saw only inside a template is not unseen)
        harm_pool, benign_pool, _, _ = _gate_pool(data_dir, cfg)
        pool = {normalise(c[-1]["content"]) for c in (*harm_pool, *benign_pool)} | train_split_texts(DataFolder(data_dir))
        rep["user_prompts"] = user_prompt_report(lm.model, lm.tokenizer, gate, user_sets, batching, lm.fingerprint,
                                                 bank, fit_on=pool)
    if cfg.written_lookalikes and other_data:
        rep["written_lookalikes"] = {"skipped": f"this gate was fit on them, and on another data folder (manifest "
                                                f"{fit_on[:12]}…) than {data_dir}: a refit here would be another gate"}
    else:
        rep["written_lookalikes"] = lookalike_report(lm.model, lm.tokenizer, gate, cfg, batching, lm.fingerprint,
                                                     data_dir, bank)
    if loso:
        rep["leave_one_source_out"] = leave_one_source_out(lm.model, lm.tokenizer, data_dir, cfg, split, batching,
                                                           lm.fingerprint, bank, shots=shots)
    if lofo:
        rep["leave_one_family_out"] = leave_one_family_out(lm.model, lm.tokenizer, data_dir, cfg, split,
                                                           batching=batching, fingerprint=lm.fingerprint, bank=bank)
    notes = []
    if split == "val" and gmeta.get("threshold_from"):
        notes.append("the threshold was chosen on this split (target_fpr): its false-positive rate here is not an "
                     "independent estimate")
    seen = {k: v["in_training_pool"] for k, v in (rep.get("user_prompts") or {}).items() if v.get("in_training_pool")}
    if seen:
        notes.append(f"{' and '.join(f'{n} of your {k} prompts' for k, n in seen.items())} are in the pool the gate "
                     f"{'was' if not other_data else 'would be'} fit on from {data_dir}: the rates "
                     "\"outside the pool\" leave them out")
    if other_data and (loso or lofo):
        notes.append(f"the gate was fit on another data folder (manifest {fit_on[:12]}…): the leave-one-out refits "
                     f"fit this folder's pool, so they measure a gate like this one, not this one")
    if "from_patch" in gmeta:
        notes.append(f"the gate was read from the gated patch {gate_dir}: patch.json's binding covers its files and base, "
                     "not the gate's recorded fit config and data hash, so the refits fit the config as patch.json reads")
    elif gmeta.get("binding") is None:
        notes.append(f"{GATE_JSON} has no binding (written before 2026-12-03): its {GATE_BOUND_FIELDS.replace(' and files', '')} "
                     "are not checked against hand edits, so the refits fit the config as it now reads")
    note = "; ".join(notes) or None
    return {"kind": "safety-patch/gate-eval", "gate": {"path": str(gate_dir), "id": gmeta["id"], "layer": gate.layer,
                                                       **({"patch": gmeta["from_patch"]["id"]} if "from_patch" in gmeta
                                                          else {}),
                                                       **({"extra_layers": list(gate.extra_layers)}
                                                          if gate.extra_layers else {}),
                                                       "threshold": gate.threshold},
            "base": {"fingerprint": lm.fingerprint},  # the model every figure below was read from
            "data": {"dir": str(Path(data_dir).resolve()), "manifest_sha256": manifest_sha256(data_dir), "split": split, "seed": seed},
            "n": sizes, **rep, **({"note": note} if note else {}), "seconds": round(time.time() - t0, 1), **provenance()}


def shots_lines(w: dict | None, pct) -> list[str]:
    """The printed lines of one leave-one-source-out fold's learning curve (``with_shots``, see
    ``crossfit._with_shots``): the rates per k with Wilson intervals, the bootstrap at the largest
    k, the k values left out and why, and a warning where few requests are measured."""
    if not w:
        return []
    if "skipped" in w:
        return [f"  with its own requests put back: skipped ({w['skipped']})"]
    m, last = w["measured_on"], w["curve"][-1]
    boot = last["direct_at_lookalike_fpr_0.05"].get("ci95_with_threshold")
    lines = [f"  with k of its {w['pool_requests']} pool requests put back, caught at 5% look-alike FPR (Wilson), all on "
             f"the same {m} requests no k put back (k=0: this fold on those {m}):",
             "    " + ", ".join(f"k={p['shots']} {pct(p['direct_at_lookalike_fpr_0.05']).strip()}" for p in w["curve"])
             + (f"; at k={last['shots']} [{100 * boot[0]:.1f}, {100 * boot[1]:.1f}] with the threshold's own "
                "uncertainty, bootstrap" if boot else "")]
    for k, why in (w.get("left_out") or {}).items():
        lines.append(f"    k={k} left out: {why}")
    if w.get("few"):
        lines.append(f"    few: {m} requests measured, so each figure above is a rough one (see its interval); "
                     "smaller k values leave more to measure")
    return lines


USER_PROMPTS_SHOWN = 5
"""Missed / fired user prompts (gate eval --harmful/--benign) the printed table lists; the JSON has all."""


def report_table(rep: dict) -> str:
    """The reliability report as a plain-text table (one row per comparison, one per set)."""
    def pct(p: dict) -> str:
        if p.get("value") is None:
            return "n/a"
        lo, hi = p["ci95"]
        return f"{100 * p['value']:5.1f}% [{100 * lo:4.1f}, {100 * hi:4.1f}]"

    lines = [f"threshold {rep['threshold']:+.3f}", f"{'comparison':<26}{'AUROC [95% CI]':<24}{'TPR@1%FPR':<24}"
             f"{'TPR@5%FPR':<24}{'FPR@threshold':<24}n+/n-"]
    for name in ("direct_vs_benign", "direct_vs_lookalikes", "wrapped_vs_wrapped_benign", "harmful_vs_benign"):
        if name not in rep:  # direct_vs_lookalikes: gate eval's report only
            continue
        c = rep[name]
        a = c["auroc"]
        auc = "n/a" if a["value"] is None else f"{a['value']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]"
        lines.append(f"{name:<26}{auc:<24}{tpr_at_fpr_text(c, 0.01, pct):<24}{tpr_at_fpr_text(c, 0.05, pct):<24}"
                     f"{pct(c['fpr_at_threshold']):<24}{a['n_pos']}/{a['n_neg']}")
        if boot := c.get("tpr_at_fpr_0.05", {}).get("ci95_with_threshold"):
            lines.append(f"  TPR@5%FPR with the threshold's own uncertainty (bootstrap): "
                         f"[{100 * boot[0]:.1f}, {100 * boot[1]:.1f}]")
    lines.append(f"{'set':<26}{'fires on [95% CI]':<24}n")
    for name, p in rep["fired"].items():
        lines.append(f"{name:<26}{pct(p):<24}{p['n']}")
    if rep.get("attacks"):
        lines.append(f"{'attack (unseen rules)':<26}{'caught [95% CI]':<24}{'fires on its benign':<24}{'AUROC':<24}n+/n-")
        for name, a in rep["attacks"].items():
            auc = "n/a" if a["auroc"]["value"] is None else f"{a['auroc']['value']:.3f}"
            lines.append(f"{name:<26}{pct(a['caught']):<24}{pct(a['fired_on_benign']):<24}{auc:<24}"
                         f"{a['caught']['n']}/{a['fired_on_benign']['n']}")
    if (lk := rep.get("written_lookalikes")) and "skipped" not in lk:
        top = sorted(lk["by_category"].items(), key=lambda kv: -kv[1]["value"])[:4]
        how = " cross-fit" if lk.get("method") == "cross-fit" else ""
        lines.append(f"{'written look-alikes' + how:<26}{pct(lk['fired']):<24}{lk['fired']['n']}  ("
                     + ("at each refit's own threshold; " if how else "") + "most fired: "
                     + ", ".join(f"{c} {v['k']}/{v['n']}" for c, v in top) + ")")
        if "at_the_gates_rate" in lk:
            label = "  at the gate's own rate"
            lines.append(f"{label:<26}{pct(lk['at_the_gates_rate']['fired']):<24}"
                         f"{lk['fired']['n']}  (each refit firing on as many validation benign prompts as the gate)")
    elif lk:
        lines.append(f"written look-alikes skipped: {lk['skipped']}")
    if up := rep.get("user_prompts"):
        for kind, key, label in (("harmful", "caught", "caught"), ("benign", "fired", "fires on")):
            if kind in up:
                lines.append(f"{'your ' + kind + ' prompts':<26}{pct(up[kind][key]):<24}{up[kind][key]['n']}  "
                             f"({label}; {up[kind]['file']})")
                if up[kind].get("in_training_pool"):  # in-sample prompts: the figure without them beside it
                    lines.append(f"{'  outside the gate pool':<26}{pct(up[kind][key + '_outside_pool']):<24}"
                                 f"{up[kind][key + '_outside_pool']['n']}  ({up[kind]['in_training_pool']} of "
                                 "your prompts are in the gate's training pool)")
                # the categories where the gate errs most, then a few of the prompts it erred on:
                # what a user reads the table for (the JSON keeps them all)
                worst = sorted(up[kind]["by_category"].items(),
                               key=lambda kv: kv[1]["value"] if kind == "harmful" else -kv[1]["value"])[:6]
                if len(up[kind]["by_category"]) > 1:
                    lines.append(f"  by category ({'least caught' if kind == 'harmful' else 'most fired'} first): "
                                 + ", ".join(f"{c} {v['k']}/{v['n']}" for c, v in worst))
                errs = up[kind]["missed_prompts" if kind == "harmful" else "fired_prompts"]
                for q in errs[:USER_PROMPTS_SHOWN]:
                    q = " ".join(q.split())
                    lines.append(f"  {'missed' if kind == 'harmful' else 'fired'}: {q[:100]}{'…' if len(q) > 100 else ''}")
                if len(errs) > USER_PROMPTS_SHOWN:
                    lines.append(f"  … {len(errs) - USER_PROMPTS_SHOWN} more in the JSON report")
        for key, label in (("harmful_vs_benign", "yours: harmful vs benign"),
                           ("harmful_vs_benign_outside_pool", "  outside the gate pool")):
            if key not in up:
                continue
            c = up[key]
            a = c["auroc"]
            auc = "n/a" if a["value"] is None else f"{a['value']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]"
            lines.append(f"{label:<26}{auc:<24}{tpr_at_fpr_text(c, 0.01, pct):<24}"
                         f"{tpr_at_fpr_text(c, 0.05, pct):<24}{pct(c['fpr_at_threshold']):<24}{a['n_pos']}/{a['n_neg']}")
    held_rows = []
    for src, r in rep.get("leave_one_source_out", {}).get("sources", {}).items():
        for name in ("direct_vs_benign", "wrapped_vs_wrapped_benign"):
            if name not in r:  # a source without wrapped rows
                continue
            c = r[name]
            a = c["auroc"]
            auc = "n/a" if a["value"] is None else f"{a['value']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]"
            label = f"LOSO {src} {name.split('_')[0]}"
            held_rows.append(f"{label:<26}{' ' * (len(label) >= 26)}{auc:<24}{tpr_at_fpr_text(c, 0.01, pct):<24}"
                             f"{tpr_at_fpr_text(c, 0.05, pct):<24}{pct(c['tpr_at_threshold']):<24}"
                             f"{pct(c['fpr_at_threshold']):<24}{a['n_pos']}/{a['n_neg']}")
            if name != "direct_vs_benign":
                continue
            # the stricter bar (5% of the look-alikes alone fire), then which kinds of harm the refit
            # misses there: what the pool does not teach (the JSON has both thresholds)
            la = r.get("direct_at_lookalike_fpr_0.05")
            if la:
                boot = la.get("ci95_with_threshold")
                held_rows.append(f"  at 5% look-alike FPR: {pct(la)} caught ({la['k']}/{la['n']}; borderline prompts "
                                 f"alone as negatives, {la['fpr_reached']['k']}/{la['fpr_reached']['n']} fire"
                                 + (f"; [{100 * boot[0]:.1f}, {100 * boot[1]:.1f}] with the threshold's own "
                                    "uncertainty, bootstrap" if boot else "") + ")")
            held_rows += shots_lines(r.get("with_shots"), pct)
            by = r.get("direct_by_category") or {}
            if len(by) > 1:
                key = "at_lookalike_fpr_0.05" if la else "at_threshold"
                worst = sorted(by.items(), key=lambda kv: (kv[1][key]["value"], kv[0]))
                held_rows.append(f"  by category, caught {'there' if la else 'at threshold'} (least first): "
                                 + ", ".join(f"{cat} {v[key]['k']}/{v[key]['n']}" for cat, v in worst))
    lofo = rep.get("leave_one_family_out")
    nested = lofo.get("at_family_threshold_nested") if lofo and "skipped" not in lofo else None
    if lofo and "skipped" not in lofo:
        c = lofo["wrapped_vs_wrapped_benign"]
        a = c["auroc"]
        auc = "n/a" if a["value"] is None else f"{a['value']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]"
        # at the gate's own threshold: for a raised gate (family_fpr) the nested figure, the raise
        # set on other families (the in-sample one would be the target rate by construction)
        at = nested if nested else c
        held_rows.append(f"{'LOFO wrapped (train fam.)':<26}{auc:<24}{tpr_at_fpr_text(c, 0.01, pct):<24}"
                         f"{tpr_at_fpr_text(c, 0.05, pct):<24}{pct(at['tpr_at_threshold']):<24}"
                         f"{pct(at['fpr_at_threshold']):<24}{a['n_pos']}/{a['n_neg']}")
    if held_rows:
        lines.append(f"{'held out (refit without)':<26}{'AUROC [95% CI]':<24}{'TPR@1%FPR':<24}{'TPR@5%FPR':<24}"
                     f"{'caught@threshold':<24}{'FPR@threshold':<24}n+/n-")
        lines += held_rows
    if lofo and "skipped" in lofo:
        lines.append(f"leave-one-family-out skipped: {lofo['skipped']}")
    elif lofo:
        c = lofo["wrapped_vs_wrapped_benign"]
        if nested:
            lines.append(f"  LOFO: {lofo['families']} train template families in {len(lofo['folds'])} folds, at the gate's "
                         f"threshold (raised by {lofo['raise_for_family_fpr']:+.3f} for family_fpr; each fold's raise "
                         f"set on the other folds' families). Before the raise: {pct(c['tpr_at_threshold']).strip()} "
                         f"caught, {pct(c['fpr_at_threshold']).strip()} of wrapped safe prompts fire")
        else:
            lines.append(f"  LOFO: {lofo['families']} train template families in {len(lofo['folds'])} folds, at the gate's "
                         "threshold")
    if few_negatives(rep):
        lines.append(FEW_NEGATIVES_NOTE)
    return "\n".join(lines)
