"""The report as a list of blocks (headings, paragraphs, tables, images) built from :class:`RunData`."""

from __future__ import annotations

from .claims import claims
from .numbers import fmt, num, pct, pct_kn
from .read import RunData


def blocks(rd: RunData) -> list[tuple]:
    B: list[tuple] = []
    plan = rd.info.get("plan", {})
    B.append(("h1", "safety-patch reproduce report"))
    fp = rd.info.get("model_fingerprint")
    B.append(("p", f"Model `{plan.get('model')}`{f' (weights {fp[:12]})' if isinstance(fp, str) else ''}, "
                   f"mode `{plan.get('mode')}`, seeds {plan.get('seeds')}, "
                   f"total time {rd.info.get('total_seconds', 0) / 60:.1f} min this invocation (cached stages cost "
                   f"nothing), {rd.stage_seconds() / 60:.1f} min of stage time in all. "
                   f"Attack success is judged by the `{rd.judge()}` judge (validation: bench/judge_validation.py); "
                   "over-refusal counts refused and degenerate (empty/babble) answers as not answered; intervals are "
                   "Wilson 95% for rates and bootstrap 95% for means."))
    if plan.get("mode") == "quick":
        B.append(("p", "**Quick sizes.** Every number below comes from quick mode: 32 safety rows per arm trained "
                       "for 3 epochs at 5x the recipes' learning rates (12 optimiser steps; 24 for a data-mixing arm, whose "
                       "general rows double its set), 20 test behaviours, "
                       "a smaller gate pool, and one data-mixing arm (general:safety 1:1) instead of two. It shows what each arm does, with wide intervals; the paper's "
                       "claims are tested at default sizes (`make reproduce`)."))
    if rd.manifest:
        c = rd.manifest["counts"]
        n_test, lim = c["behaviours_per_split"].get("test", 0), plan.get("eval_limit")
        used = f" (the evaluations use {lim} of them)" if lim and lim < n_test else ""
        B.append(("p", f"Data: {c['rows_per_split'].get('train', 0)} training conversations, "
                       f"{n_test} held-out test behaviours{used}, "
                       f"{c['template_families_per_split'].get('test', 0)} held-out template families."))
    missing = rd.missing()
    if missing:  # a table without an arm, or a section without its file, must say so, not look complete
        B.append(("p", "**Missing from this run** (tables below lack these; re-run `reproduce` on the folder to "
                       "redo those stages): " + ", ".join(f"`{m}`" for m in missing) + "."))
    B.append(("h2", "Claims"))
    cl = claims(rd)
    B.append(("table", ["claim", "verdict", "evidence", "rule"], [[c["claim"], c["verdict"].upper(), c["evidence"], c["rule"]] for c in cl]))
    fig = rd.run / "tradeoff.png"
    if fig.is_file():
        B.append(("h2", "Trade-off"))
        B.append(("img", fig, "safety against capability retention and over-refusal"))
    B.append(("h2", "Attack success per attack"))
    attacks = []
    for m in rd.models:
        r = rd.run_of(m, "safety")
        if r:
            attacks = list(r["aggregates"]["per_attack"])
            break
    rows = []
    for m in rd.models:
        r = rd.run_of(m, "safety")
        if r:
            rows.append([m, pct_kn(r["aggregates"]["overall"])]
                        + [pct_kn(r["aggregates"]["per_attack"].get(a)) for a in attacks])
    B.append(("table", ["model", "overall"] + attacks, rows))
    B.append(("h2", "Attack success per category"))
    cats = sorted({c for m in rd.models if rd.run_of(m, "safety") for c in rd.run_of(m, "safety")["aggregates"]["per_category"]})
    B.append(("table", ["model"] + cats, [[m] + [pct(rd.run_of(m, "safety")["aggregates"]["per_category"].get(c)) for c in cats]
                                         for m in rd.models if rd.run_of(m, "safety")]))
    B.append(("h2", "Over-refusal"))
    B.append(("p", "Not answered = refused + degenerate (empty or babble): a patch that silences safe prompts counts "
                   "against itself here (docs/evaluation.md)."))
    B.append(("table", ["model", "borderline-benign not answered", "general not answered"],
              [[m, pct_kn(rd.borderline(m)), pct_kn(rd.general_refusal(m))] for m in rd.models
               if rd.run_of(m, "overrefusal")]))
    routed = [m for m in rd.models if any("routing" in (rd.run_of(m, k) or {}).get("aggregates", {})
                                          for k in ("safety", "overrefusal"))]
    if routed:
        B.append(("h2", "Gate routing"))
        B.append(("p", "Where each gated arm's gate sent prompts to its refusal adapter (from each answer's own "
                       "record of its route): attacked harmful prompts, and the safe sets. Attack success among "
                       "the prompts the gate let through is the gate's misses; among the routed, the adapter's."))

        def routing(m: str, kind: str) -> dict:
            return ((rd.run_of(m, kind) or {}).get("aggregates") or {}).get("routing") or {}

        B.append(("table", ["model", "harmful routed", "attack success when routed", "attack success when not routed",
                            "borderline routed", "general routed"],
                  [[m, pct_kn(routing(m, "safety").get("routed")),
                    pct_kn(routing(m, "safety").get("labels_when_routed")),
                    pct_kn(routing(m, "safety").get("labels_when_not_routed")),
                    pct_kn(routing(m, "overrefusal").get("routed_per_set", {}).get("borderline")),
                    pct_kn(routing(m, "overrefusal").get("routed_per_set", {}).get("general"))] for m in routed]))
    if rd.gate_eval:
        B += gate_blocks(rd.gate_eval)
    B.append(("h2", "Capability"))
    crow = []
    for m in rd.models[1:]:
        c = rd.eval[m]["capability"]
        if not c:
            continue
        runs = c["runs"]
        crow.append([m, num(runs["base"].get("nll")), num(runs["patched"].get("nll")), fmt(rd.nll_ratio(m)),
                     num(runs["patched"].get("kl")), pct(runs["patched"].get("compliance")), pct(runs["patched"].get("humaneval"))])
    head = ["arm", "NLL base", "NLL patched", "NLL ratio", "KL(base||patched)", "benign answered", "HumanEval pass@1"]
    tasks = plan.get("capability_tasks")
    if tasks is not None and "humaneval" not in tasks:  # not run by this plan: no column of dashes
        head, crow = head[:-1], [r[:-1] for r in crow]
    B.append(("table", head, crow))
    if crow:
        B.append(("p", "\"benign answered\" is the capability suite's share of its general prompts answered, judged "
                       "by the `keyword` judge (a cheap check beside NLL and KL); the over-refusal table's \"not answered\" "
                       f"uses the `{rd.judge()}` judge, so the two can differ for the same prompts."))
    if tasks is not None and "humaneval" not in tasks:
        B.append(("p", f"HumanEval was not run: this plan's capability tasks are {', '.join(tasks)}"
                       + (" (quick mode)." if plan.get("mode") == "quick" else ".")))
    for task, why in (rd.info.get("skipped") or {}).items():
        B.append(("p", f"{task} was not run: {why}."))
    B.append(("h2", "Cost"))
    cost, mix_total, lora_total = [], 0.0, 0.0
    for a in rd.arms:
        pj = rd.patch.get(a["name"])
        if not pj:
            continue
        t = pj["training"]
        cost.append([a["name"], a["role"], f"{t['wall_seconds']:.0f}", f"{t['peak_memory_mb']:.0f}", str(t["tokens_seen"]),
                     f"{t['trainable_parameters']:,}"])
        if a["role"] == "full-mix":
            mix_total += t["wall_seconds"]
        if a["role"] == "lora-safety":
            lora_total += t["wall_seconds"]
    B.append(("table", ["arm", "role", "train seconds", "peak memory MB (GPU: allocator peak; CPU: peak resident set while training)", "tokens", "trainable parameters"], cost))
    gated = [a["name"] for a in rd.arms if a["role"].endswith("-gated") and rd.patch.get(a["name"])]
    if gated:
        B.append(("p", f"{', '.join(gated)}: the row repeats the training of the patch put behind the gate, which is "
                       "trained once; the gate's own cost is the 02-gate stage (Stage timings)."))
    if mix_total and lora_total:
        n_mix = len(rd.by_role('full-mix'))
        B.append(("p", f"The data-mixing search ({n_mix} ratio{'s' if n_mix != 1 else ''}) cost {mix_total:.0f} s of training; the "
                       f"single LoRA patch {lora_total:.0f} s ({mix_total / lora_total:.1f}x less)."))
    if rd.analysis:
        B.append(("h2", "Orthogonality and magnitude"))
        ks = rd.analysis["ks"]
        srows = []
        for name, s in rd.analysis["summary"].items():
            srows.append([name] + [f"{s[f'median_in_overlap@{k}']:.4f} (rand {s[f'random_in_overlap@{k}']:.4f})" for k in ks]
                         + [f"{s[f'median_in_max_entry@{ks[0]}']:.3f} (rand {s[f'random_in_max_entry@{ks[0]}']:.3f})",
                            f"{s['median_rel_norm']:.4g}"])
        B.append(("table", ["patch"] + [f"overlap k={k}" for k in ks] + [f"paper max-entry k={ks[0]}", "median ||dW||/||W0||"], srows))
        for f in ("overlap_per_layer.png", "magnitude_per_layer.png"):
            p = rd.run / "05-analysis" / "out" / f
            if p.is_file():
                B.append(("img", p, f))
    hs = rd.run / "05-analysis" / "out" / "hidden_shift.png"
    if hs.is_file():
        B.append(("h2", "Hidden-state shifts"))
        B.append(("img", hs, "relative hidden-state shift, benign vs jailbreak"))
    if rd.plug:
        B.append(("h2", "Plug-and-play"))
        B.append(("table", ["check", "value"], [[k, f"{v:.3g}"] for k, v in rd.plug.items()]))
    B.append(("h2", "Stage timings"))
    # in run order (run.json keeps the order the stages ran in), then the whole run with its overhead
    timings = list(rd.info.get("timings", {}).items())
    total = rd.info.get("total_seconds")
    B.append(("table", ["stage", "seconds"], [[k, f"{v:.0f}"] for k, v in timings]
              + ([["this invocation (the stages it ran + loading and bookkeeping)", f"{total:.0f}"]]
                 if total is not None else [])))
    return B


def gate_blocks(g: dict) -> list[tuple]:
    """The gate's reliability on the held-out split (``gate eval``'s report, gate.evaluate.evaluate_gate)."""
    from ..evaluation.stats import FEW_NEGATIVES_NOTE, tpr_at_fpr_text

    def auc(a: dict) -> str:
        return "n/a" if a.get("value") is None else f"{a['value']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]"

    B: list[tuple] = [("h2", "Gate reliability")]
    layers = [g["gate"]["layer"], *g["gate"].get("extra_layers", [])]
    B.append(("p", f"The gate of the `+gate` arms (layer{'s' * (len(layers) > 1)} {', '.join(map(str, layers))}, "
                   f"fires above logit "
                   f"{g['gate']['threshold']:+.3f}), on the held-out `{g['data']['split']}` split: harmful requests direct "
                   "and inside held-out jailbreak template families against borderline-benign, general and wrapped "
                   "benign prompts; TPR at 1%/5% FPR sets the threshold on this split's benign prompts (an oracle "
                   "threshold, for comparison); the rates at the gate's own threshold are what routing does."))
    rows = []
    for name in ("direct_vs_benign", "wrapped_vs_wrapped_benign", "harmful_vs_benign"):
        c = g[name]
        rows.append([name, auc(c["auroc"]), tpr_at_fpr_text(c, 0.01, pct), tpr_at_fpr_text(c, 0.05, pct),
                     pct(c["tpr_at_threshold"]), pct(c["fpr_at_threshold"]),
                     f"{c['auroc'].get('n_pos', '-')}/{c['auroc'].get('n_neg', '-')}"])
    # the gate is measured on every test behaviour, the arms' evaluations on a limited number of them
    B.append(("table", ["comparison", "AUROC [95% CI]", "TPR at 1% FPR", "TPR at 5% FPR", "TPR at threshold",
                        "FPR at threshold", "n harmful / benign"], rows))
    if any(c.get("too_few_negatives") for name in ("direct_vs_benign", "wrapped_vs_wrapped_benign", "harmful_vs_benign")
           for c in (g[name].get("tpr_at_fpr_0.01") or {}, g[name].get("tpr_at_fpr_0.05") or {})):
        B.append(("p", FEW_NEGATIVES_NOTE + "."))
    B.append(("table", ["set", "the gate fires on"], [[k, pct(v)] for k, v in g["fired"].items()]))
    if (lk := g.get("written_lookalikes")) and "skipped" not in lk:
        if lk.get("method") == "cross-fit":
            rate = lk.get("at_the_gates_rate", {}).get("fired")
            same = bool(rate) and rate.get("k") == lk["fired"].get("k")
            how = (f"This gate was fit on them, so each half is scored by a refit that never saw it "
                   f"({lk['folds']}-fold cross-fit): the refits fire on {pct_kn(lk['fired'])} at their own thresholds"
                   + ((", and on the same number when each is held at the gate's own firing rate on the validation "
                       "benign prompts" if same else
                       f", and on {pct_kn(rate)} when each is held at the gate's own firing rate on the validation "
                       f"benign prompts") if rate else "") + ". By category, at the refits' thresholds:")
        else:
            how = f"The gate never saw them: it fires on {pct(lk['fired'])}. By category:"
        B.append(("p", f"Hand-written safe look-alikes, not drawn from the data folder's sources (the package's "
                       f"`gate_lookalike_prompts.tsv`, {lk['fired']['n']} prompts; each one the gate fires on is a "
                       f"safe prompt sent to the refusal adapter). {how}"))
        head = "the refits fire on (their thresholds)" if lk.get("method") == "cross-fit" else "the gate fires on"
        B.append(("table", ["category", head], [[c, pct(v)] for c, v in lk["by_category"].items()]))
    elif lk:  # a gate fit on them: say so rather than leave the section out
        B.append(("p", f"Hand-written safe look-alikes (`gate_lookalike_prompts.tsv`): not scored, {lk['skipped']}."))
    if g.get("attacks"):
        B.append(("p", "Rule attacks the gate never trained on, on the split's direct requests (caught: the adapter "
                       "engages) and on its benign prompts under the same attack (cleaned controls: a gate that reads "
                       "the attack's form rather than the request fires on these too)."))
        B.append(("table", ["attack", "caught", "fires on its benign controls", "AUROC"],
                  [[a, pct(r["caught"]), pct(r["fired_on_benign"]), auc(r["auroc"])] for a, r in g["attacks"].items()]))
    loso = (g.get("leave_one_source_out") or {}).get("sources") or {}
    if loso:
        B.append(("p", "Leave one harmful source out: the gate refit without that source's prompts, measured on "
                       "its requests (direct: every train and held-out request; wrapped: the held-out ones) at the "
                       "gate's threshold, and direct at 5% look-alike FPR (the logit where 5% of the split's "
                       "borderline prompts fire; in brackets after it, a bootstrap 95% interval that also carries "
                       "that threshold's uncertainty, set as it is by a few look-alikes)."))

        def at_lookalike(r: dict) -> str:
            la = r.get("direct_at_lookalike_fpr_0.05")
            if not la:
                return "-"
            boot = la.get("ci95_with_threshold")
            return pct(la) + (f"; [{100 * boot[0]:.1f}, {100 * boot[1]:.1f}]" if boot else "")

        rows = [[s, pct(r["direct_vs_benign"]["tpr_at_threshold"]), at_lookalike(r), auc(r["direct_vs_benign"]["auroc"]),
                 *((pct(w["tpr_at_threshold"]), auc(w["auroc"])) if (w := r.get("wrapped_vs_wrapped_benign"))
                   else ("-", "-"))]
                for s, r in loso.items()]
        if (inside := g.get("direct_vs_lookalikes")) and "tpr_at_fpr_0.05" in inside:
            # what the folds are compared with: the gate itself, every source in its pool, on the split's requests
            rows.append(["none (the gate itself, on the split's requests)", pct(g["fired"]["harmful_direct"]),
                         at_lookalike({"direct_at_lookalike_fpr_0.05": inside["tpr_at_fpr_0.05"]}),
                         auc(g["direct_vs_benign"]["auroc"]), pct(g["fired"]["harmful_wrapped"]),
                         auc(g["wrapped_vs_wrapped_benign"]["auroc"])])
        B.append(("table", ["held-out source", "direct caught", "direct at 5% look-alike FPR", "direct AUROC",
                            "wrapped caught", "wrapped AUROC"], rows))
        curves = {s: w for s, r in loso.items() if "curve" in (w := r.get("with_shots") or {})}
        if curves:
            ks = sorted({p["shots"] for w in curves.values() for p in w["curve"]})
            B.append(("p", "How many of a held-out source's own requests the gate needs: each fold refit again with "
                           "k of the source's pool requests put back (nested draws), every k measured on the same "
                           "requests (those no k put back), direct caught at 5% look-alike FPR with a Wilson interval; "
                           "the last column carries the threshold's own uncertainty at the largest k (bootstrap). "
                           "'-': a k the source cannot give (more than its pool requests, or none left to measure)."))

            def at(w: dict, k: int) -> str:
                p = next((p for p in w["curve"] if p["shots"] == k), None)
                return pct(p["direct_at_lookalike_fpr_0.05"]) if p else "-"

            def boot(w: dict) -> str:
                last = w["curve"][-1]
                b = last["direct_at_lookalike_fpr_0.05"].get("ci95_with_threshold")
                return f"k={last['shots']}: [{100 * b[0]:.1f}, {100 * b[1]:.1f}]" if b else "-"

            B.append(("table", ["held-out source", "pool requests", "measured on", *(f"k={k}" for k in ks),
                                "bootstrap at the largest k"],
                      [[s + (" (few)" if w.get("few") else ""), str(w["pool_requests"]), str(w["measured_on"]),
                        *(at(w, k) for k in ks), boot(w)] for s, w in curves.items()]))
    if lofo := g.get("leave_one_family_out"):
        c = lofo["wrapped_vs_wrapped_benign"]
        B.append(("p", f"Leave one template family out: the gate refit without each group of the train split's "
                       f"{lofo['families']} template families ({len(lofo['folds'])} groups), scoring that group's "
                       f"wrapped prompts at the threshold it would have set (a template it never saw; the held-out "
                       f"split above has its own, fewer families)."))
        rows = [["wrapped vs wrapped safe", auc(c["auroc"]), pct(c["tpr_at_threshold"]), pct(c["fpr_at_threshold"])]]
        n = lofo.get("at_family_threshold_nested")  # a raised gate (family_fpr): at its own threshold, nested
        if n and any(n["raises"]):  # with no group raised the nested row would repeat the first
            rows.append([f"the same at the raised threshold (each group's raise set on the other groups: "
                         f"{', '.join(f'{r:+.2f}' for r in n['raises'])})", auc(n["auroc"]),
                         pct(n["tpr_at_threshold"]), pct(n["fpr_at_threshold"])])
        B.append(("table", ["comparison", "AUROC [95% CI]", "wrapped harmful caught", "wrapped safe fired"], rows))
        if n and not any(n["raises"]):
            B.append(("p", "The gate's out-of-family raise (`family_fpr`) moved no group's threshold here, so "
                           "these are also the rates at the gate's own threshold."))
    return B
