"""Lifelong red-teaming on the embedded model: 3 chained `redteam` rounds, LoRA vs full-parameter.

Run: .venv/bin/python experiments/redteam_rounds.py --data DIR [--attacks past_tense,refusal_suppression,roleplay]
     [--methods lora,full] [--limit 40] [--epochs 3] [--work DIR]

Each method starts from the base model; round k attacks base + the patches of rounds 1..k-1
with its attack family on *training* behaviours, trains the next patch on the jailbreaks that
worked (plus half of every earlier round's rows, replayed) on top of the stack, then checks
regression on the *test* behaviours: ASR of every attack family so far before/after the round,
borderline refusal, NLL ratio and KL to the base. Rounds are resumable (a finished round folder
is read back, not re-run). Same calls as `safety-patch redteam --previous ... --patch ...`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import WORK, print_table, write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--attacks", default="past_tense,refusal_suppression,roleplay")
    ap.add_argument("--methods", default="lora,full")
    ap.add_argument("--limit", type=int, default=40)
    ap.add_argument("--epochs", type=float, default=3.0,
                    help="per round: a round's few dozen jailbreaks are 3-5 steps per epoch")
    ap.add_argument("--work", default=str(WORK / "redteam_rounds"))
    args = ap.parse_args()
    from safety_patch.redteam import run_round
    from safety_patch.runtime import configure_threads

    configure_threads()
    attacks = [a.strip() for a in args.attacks.split(",") if a.strip()]
    work = Path(args.work)
    rows, tables = [], {}
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        done: list[Path] = []
        tables[method] = []
        for k, attack in enumerate(attacks, 1):
            rd = work / method / f"round{k}-{attack}"
            if (rd / "round.json").is_file():
                t = json.loads((rd / "round.json").read_text())
            else:
                t = run_round("default", [p / "patch" for p in done], attack, Path(args.data), rd, method=method,
                              previous=done, limit=args.limit, train_overrides={"optim.epochs": args.epochs})
            done.append(rd)
            tables[method].append(t)
            row = {"method": method, "round": k, "attack": attack, "found": f"{t['successes_found']}/{t['attacked']}",
                   "train_rows": t["train_rows"]}
            for j, a in enumerate(attacks[:k], 1):
                r = t["regression_asr"][a]
                row[f"r{j} {a} before"] = r["before"]["value"]
                row[f"r{j} {a} after"] = r["after"]["value"]
            row["borderline"] = t["borderline_refusal"]["value"]
            row["borderline_base"] = t["borderline_refusal_base"]["value"]
            row["nll_ratio"] = t["nll_ratio"]
            row["train_s"] = t["train_seconds"]
            row["round_s"] = t["seconds"]
            rows.append(row)
    cols = ["method", "round", "attack", "found", "train_rows"]
    for j, a in enumerate(attacks, 1):
        cols += [f"r{j} {a} before", f"r{j} {a} after"]
    cols += ["borderline", "borderline_base", "nll_ratio", "train_s", "round_s"]
    print_table(rows, cols)
    write("redteam_rounds", {"attacks": attacks, "limit": args.limit, "epochs": args.epochs, "table": rows,
                             "rounds": tables}, args=args)


if __name__ == "__main__":
    main()
