"""The out-of-family raise's rate (gate.family_fpr) on the default gate, validation only (issue 23).

Run: .venv/bin/python experiments/gate_family_fpr.py --data runs/data-seed1 [--rates 0.03,0.04,0.05]

The default gate (GateFitConfig's defaults) refit with each ``family_fpr``: its threshold, the
validation sets it fires on, the train pool's wrapped prompts out of template family (nested: each
fold's raise set on the other folds), and the hand-written look-alikes cross-fit
(``gate.crossfit.lookalike_report``). The test split's wrapped safe prompts were routed at 5.6% by the
default (0.05; session 25's look), over the ≤ 5% target: this prices a lower rate in wrapped
catch before any test look. Features come from the cache a `gate fit` filled.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="default")
    ap.add_argument("--rates", default="0.03,0.04,0.05")
    args = ap.parse_args()

    from safety_patch import runtime as rt
    from safety_patch.gate.config import GateFitConfig
    from safety_patch.gate.crossfit import lookalike_report
    from safety_patch.gate.fit import fit_gate_on_data
    from safety_patch.models import load_model

    rt.configure_threads()
    lm = load_model(args.model, device="cpu")
    results, rows = [], []
    for rate in [float(r) for r in args.rates.split(",")]:
        cfg = dataclasses.replace(GateFitConfig(), family_fpr=rate).validate()
        gate, info = fit_gate_on_data(lm.model, lm.tokenizer, args.data, cfg, fingerprint=lm.fingerprint)
        v = info["validation"]
        nested = v["leave_one_family_out"]["at_family_threshold_nested"]
        lk = lookalike_report(lm.model, lm.tokenizer, gate, cfg, fingerprint=lm.fingerprint, data=args.data)
        results.append({"family_fpr": rate, "threshold": gate.threshold, "raised_by": info["threshold_from"]["raised_by"],
                        "val_fired": v["fired"], "out_of_family_nested": {k: nested[k] for k in
                                                                          ("tpr_at_threshold", "fpr_at_threshold")},
                        "lookalikes_cross_fit": lk["fired"]})
        f = v["fired"]
        rows.append({"family_fpr": rate, "thr": round(gate.threshold, 3),
                     "val dir%": 100 * f["harmful_direct"]["value"], "val wrap%": 100 * f["harmful_wrapped"]["value"],
                     "val border%": 100 * f["borderline"]["value"], "val wrapsafe%": 100 * f["wrapped_benign"]["value"],
                     "OOF wrap caught%": 100 * nested["tpr_at_threshold"]["value"],
                     "OOF wrapsafe%": 100 * nested["fpr_at_threshold"]["value"],
                     "look-alikes%": 100 * lk["fired"]["value"]})
        print(f"  family_fpr {rate}: threshold {gate.threshold:+.3f}", flush=True)
    print_table(rows)
    write("gate_family_fpr", {"data": args.data, "results": results}, args=args)


if __name__ == "__main__":
    main()
