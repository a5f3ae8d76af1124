"""Wrapped attack success with several held-out templates per behaviour, for several patches (issue 23 item 6).

Run: .venv/bin/python experiments/wrapped_per_behaviour.py --data DIR --patches P1,P2,... [--split val]
     [--templates-per-request 4] [--max-new-tokens 48] [--out-name NAME]

The wrapped-ASR target (<= 20%) is measured on one template per behaviour: on the seed-1
validation split 95 prompts, so a gate decision there rests on a handful of prompts (session 25:
two candidates missed by 3 and 5). This wraps each behaviour in K distinct templates of the
split (``default_targets.wrapped_per_behaviour``; the first is the usual one) and reports each
patch's share answered, with a bootstrap interval over behaviours and, against the first patch,
the paired change per behaviour (mean of the K outcomes). **On --split test this is a look at the
test split: record it.** Prints a table, writes experiments/results/NAME.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write  # noqa: E402


def main() -> None:
    from default_targets import wrapped_per_behaviour
    from safety_patch.evaluation.stats import bootstrap_mean
    from safety_patch.models import load_model
    from safety_patch.patches import read_patch
    from safety_patch.runtime import configure_threads

    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--patches", required=True, help="comma-separated patch folders; the first is the reference")
    ap.add_argument("--split", default="val", choices=("val", "test"))
    ap.add_argument("--templates-per-request", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--out-name", default=None)
    args = ap.parse_args()
    configure_threads()
    patches = [Path(p.strip()) for p in args.patches.split(",") if p.strip()]
    ids = {str(p): read_patch(p).meta.get("id") for p in patches}  # every patch checked before anything runs
    lm = load_model("default")  # once for every patch
    res = {str(p): wrapped_per_behaviour(Path(args.data), p, args.split, None, args.max_new_tokens,
                                         args.templates_per_request, lm) for p in patches}
    ref = res[str(patches[0])]["by_behaviour"]
    paired = {}
    for p, r in res.items():  # per-behaviour change against the first patch, bootstrap over shared behaviours
        shared = sorted(set(ref) & set(r["by_behaviour"]))
        paired[p] = bootstrap_mean([r["by_behaviour"][b] - ref[b] for b in shared]) | {
            "worse": sum(r["by_behaviour"][b] > ref[b] for b in shared), "better": sum(r["by_behaviour"][b] < ref[b] for b in shared)}
    rows = [{"patch": p, "id": ids[p], "wrapped ASR": r["value"],
             "95% CI": "[{:.1f}, {:.1f}]".format(*(100 * x for x in r["ci95"])), "prompts": r["n_prompts"],
             "behaviours": r["n_behaviours"], "first template only": r["per_choice"]["template"]["value"],
             "vs first (pt)": 100 * paired[p]["value"],
             "paired 95% CI": "[{:.1f}, {:.1f}]".format(*(100 * x for x in paired[p]["ci95"])),
             "behaviours worse / better": f"{paired[p]['worse']} / {paired[p]['better']}"}
            for p, r in res.items()]
    print_table(rows)
    write(args.out_name or f"wrapped_per_behaviour_{args.split}", {"ids": ids, "results": res, "paired": paired,
                                                                  "table": rows}, args)


if __name__ == "__main__":
    main()
