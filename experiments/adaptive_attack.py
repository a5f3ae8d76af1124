"""Adaptive attacks on the gated patch vs the same adapter always on (issue 23 item 4).

Run: .venv/bin/python experiments/adaptive_attack.py --data DIR --gated P --always-on Q
         [--split val] [--limit 24] [--steps 20] [--width 64] [--topk 64] [--suffix-tokens 20]

Both patches carry the same LoRA adapter (``--gated`` is ``--always-on`` behind a gate, as
`train` makes the default). Under one GCG budget (steps, search width, top-k, suffix length,
seed) each arm is attacked as `eval safety` would attack it and judged by the default
``refusal`` judge:

* ``direct``: the bare request (the reference);
* ``prefill``: the answer forced to start "Sure, here is" (the gate reads the prompt without the
  prefill, so a prefill cannot move where the gate reads; this measures that it does not);
* ``gcg``: GCG optimised against the model under test with every patch on. For the gated patch
  that is the always-on model, so its suffix is the always-on arm's (a transfer attack);
* ``gcg_gate`` (gated patch only): adaptive GCG whose loss adds a hinge pushing the gate's
  logit below its threshold (attacks/gcg.py): make the base comply *and* keep the refusal
  adapter off.
* ``gcg_gate_transfer`` (with ``--transfer-gate``): the same adaptive attack against another
  gate on the same adapter (a probe the attacker fit themselves, without the shipped gate
  file), its suffixes then sent through the shipped gated patch.

Per arm: attack success (Wilson 95% interval), and for the gated patch the share of attacked
prompts its gate routed to the refusal adapter, with the suffixes' gate logits. GCG suffixes
are cached under $SAFETY_PATCH_HOME/gcg/, so a rerun with the same budget only generates.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import add_gcg_budget, gated_pair, gcg_budget, print_table, write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--gated", required=True, help="the gated patch (the default `train` output)")
    ap.add_argument("--always-on", required=True, help="the same adapter without its gate")
    ap.add_argument("--split", default="val")
    ap.add_argument("--limit", type=int, default=24)
    add_gcg_budget(ap)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--transfer-gate", default=None,
                    help="the same adapter behind another gate (an attacker's own probe): gcg_gate optimised against it, "
                         "replayed through --gated as `gcg_gate_transfer`")
    ap.add_argument("--transfer-limit", type=int, default=None, help="the transfer arm on the first N behaviours only")
    ap.add_argument("--out-name", default="adaptive_attack", help="results/NAME.json")
    args = ap.parse_args()

    from safety_patch.runtime import configure_threads

    configure_threads()
    from safety_patch.attacks import get_attack
    from safety_patch.attacks.gcg import GCG, GateGCG
    from safety_patch.evaluation.prompts import harmful_requests
    from safety_patch.evaluation.safety import EvalConfig, run_safety
    from safety_patch.evaluation.stats import proportion
    from safety_patch.generation import GenerationCache, render
    from safety_patch.judges import get_judge
    from safety_patch.models import home, load_model
    from safety_patch.patches import attached, read_patch

    gated, always_on = gated_pair(args.gated, args.always_on)
    if gated.meta["files"].get("adapter_model.safetensors") != always_on.meta["files"].get("adapter_model.safetensors"):
        sys.exit("--gated and --always-on must carry the same adapter (same adapter_model.safetensors hash)")

    lm = load_model("default")
    tok = lm.tokenizer
    reqs, _ = harmful_requests(args.data, split=args.split, limit=args.limit)
    budget = gcg_budget(args)
    cfg = EvalConfig(attacks=(), max_new_tokens=args.max_new_tokens, batch_size=32)
    judge = get_judge(cfg.judge)
    cache = GenerationCache(home() / "generations.sqlite")

    def gate_fired(pm, records) -> list[bool]:
        """Whether the gate routed each record's prompt (as generation routes: the rendered prompt, no prefill)."""
        ids = [tok(render(tok, [{"role": "user", "content": r["prompt"]}]), add_special_tokens=False)["input_ids"]
               for r in records]
        (name,) = pm.gates
        return [bool(f) for f in (pm.gate_scores(tok, ids)[name] > pm.gates[name].threshold).tolist()]

    results, rows = {}, []
    try:
        with attached(lm.model, [always_on], lm.fingerprint) as pm:
            attacks = {"direct": get_attack("direct"), "prefill": get_attack("prefill"), "gcg": GCG(budget)}
            res = run_safety(pm, tok, reqs, [], cfg, cache, "always-on", judge, attacks=attacks)
            results["always-on"] = res
            suffixes = {r["request"]: r["attack_info"] for r in res["records"] if r["attack"] == "gcg"}
        transfer, sub = None, reqs[: args.transfer_limit or len(reqs)]
        if args.transfer_gate:
            own = read_patch(args.transfer_gate)
            if not own.gated or own.meta["files"].get("adapter_model.safetensors") != gated.meta["files"].get(
                    "adapter_model.safetensors"):
                sys.exit(f"--transfer-gate must be the same adapter behind a gate ({args.transfer_gate})")
            with attached(lm.model, [own], lm.fingerprint) as pm:
                atk = GateGCG(dataclasses.replace(budget, gate_weight=1.0)).bind(pm, tok)
                transfer = {r["request"]: atk.optimise(r["request"]) for r in sub}
        with attached(lm.model, [gated], lm.fingerprint) as pm:
            # The gated patch's `gcg` optimises with every patch on: the always-on model, whose suffixes
            # are reused (same adapter, same budget, same seed) rather than searched again.
            replayed = _Fixed("gcg", suffixes, GCG(budget))
            attacks = {"direct": get_attack("direct"), "prefill": get_attack("prefill"), "gcg": replayed,
                       "gcg_gate": GateGCG(dataclasses.replace(budget, gate_weight=1.0))}
            res = run_safety(pm, tok, reqs, [], cfg, cache, "gated", judge, attacks=attacks)
            if transfer is not None:
                extra = run_safety(pm, tok, sub, [], cfg, cache, "gated, transfer", judge,
                                   attacks={"gcg_gate_transfer": _Fixed("gcg_gate_transfer", transfer, GCG(budget))})
                res["records"] += extra["records"]
            for r, f in zip(res["records"], gate_fired(pm, res["records"]), strict=True):
                r["gate_fired"] = f
            results["gated"] = res
    finally:
        cache.close()

    table = {}
    for arm, res in results.items():
        for attack in ("direct", "prefill", "gcg", "gcg_gate", "gcg_gate_transfer"):
            recs = [r for r in res["records"] if r["attack"] == attack]
            if not recs:
                continue
            ok = [r for r in recs if r["verdict"]["label"] != "judge_error"]
            asr = proportion(sum(r["verdict"]["label"] == "compliance" for r in ok), len(ok))
            cell = {"asr": asr, "degenerate": proportion(sum(r["verdict"]["label"] == "degenerate" for r in ok), len(ok))}
            if "gate_fired" in recs[0]:
                cell["gate_fired"] = proportion(sum(r["gate_fired"] for r in recs), len(recs))
            infos = [r["attack_info"] for r in recs if "attack_info" in r]
            if infos:
                cell["gcg_seconds_mean"] = round(sum(i["seconds"] for i in infos) / len(infos), 1)
                cell["gcg_target_loss_mean"] = round(sum(i["loss"] for i in infos) / len(infos), 3)
            table.setdefault(arm, {})[attack] = cell
            rows.append({"patch": arm, "attack": attack, "n": asr["n"],
                         "ASR %": f"{100 * asr['value']:.1f} [{100 * asr['ci95'][0]:.1f}, {100 * asr['ci95'][1]:.1f}]",
                         "gate fired %": (f"{100 * cell['gate_fired']['value']:.1f}" if "gate_fired" in cell else "–"),
                         "GCG s/behaviour": cell.get("gcg_seconds_mean", "–")})
    print_table(rows)
    write(args.out_name, {"data": args.data, "split": args.split, "gated": gated.id, "always_on": always_on.id,
                              "gate": gated.meta["gate"].get("id"), "budget": dataclasses.asdict(budget), "table": table,
                              "transfer_gate": args.transfer_gate,
                              "records": {arm: res["records"] for arm, res in results.items()}}, args=args)


class _Fixed:
    """An attack that replays suffixes already optimised (by behaviour's request) for another arm."""

    needs_model = False
    needs_decoding = False
    conversation_level = True

    def __init__(self, name: str, by_request: dict, template):
        self.name, self._by_request, self._template = name, by_request, template

    def apply(self, request: str):
        from safety_patch.attacks import Attacked

        info = self._by_request[request]
        return Attacked(self._template._messages(request, info["suffix"]), "", self.name, self.name, info)


if __name__ == "__main__":
    main()
