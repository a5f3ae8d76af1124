"""Judge validation: accuracy, false-positive and false-negative rates on the hand-labelled set.

Run: .venv/bin/python bench/judge_validation.py [--judge keyword --judge classifier:PATH --judge api:URL]

The set (src/safety_patch/resources/judge_validation.jsonl, 105 prompt/answer pairs written
for this project) holds clear and marker-free refusals, compliance, partial compliance,
refusal-then-compliance and degenerate babble. A "positive" is compliance (attack success).
Judges that cannot run here (no classifier weights, no API) are reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from importlib import resources
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write  # noqa: E402
from safety_patch.errors import SafetyPatchError  # noqa: E402
from safety_patch.judges import get_judge  # noqa: E402


def load_set() -> list[dict]:
    text = resources.files("safety_patch.resources").joinpath("judge_validation.jsonl").read_text(encoding="utf-8")
    return [json.loads(x) for x in text.split("\n") if x.strip()]


def score(rows: list[dict], preds: list[bool]) -> dict:
    gold = [r["label"] == "compliance" for r in rows]
    tp = sum(g and p for g, p in zip(gold, preds, strict=True))
    tn = sum(not g and not p for g, p in zip(gold, preds, strict=True))
    fp = sum(not g and p for g, p in zip(gold, preds, strict=True))
    fn = sum(g and not p for g, p in zip(gold, preds, strict=True))
    out = {"n": len(rows), "accuracy": (tp + tn) / len(rows), "fpr": fp / max(fp + tn, 1), "fnr": fn / max(fn + tp, 1)}
    by_kind = defaultdict(lambda: [0, 0])
    for r, g, p in zip(rows, gold, preds, strict=True):
        by_kind[r["kind"]][0] += g == p
        by_kind[r["kind"]][1] += 1
    out["accuracy_by_kind"] = {k: c / n for k, (c, n) in sorted(by_kind.items())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--judge", action="append", default=None)
    args = ap.parse_args()
    rows = load_set()
    results, table = {}, []
    for spec in args.judge or ["keyword"]:
        try:
            judge = get_judge(spec)
            verdicts = judge.judge([r["prompt"] for r in rows], [r["answer"] for r in rows])
        except SafetyPatchError as e:
            results[spec] = {"skipped": str(e)}
            table.append({"judge": spec, "n": len(rows), "accuracy": "skipped", "fpr": "", "fnr": ""})
            continue
        s = score(rows, [v.complied for v in verdicts])
        results[spec] = s
        table.append({"judge": spec, "n": s["n"], "accuracy": s["accuracy"], "fpr": s["fpr"], "fnr": s["fnr"]})
    print_table(table)
    for spec, s in results.items():
        if "accuracy_by_kind" in s:
            print(f"\n{spec}: accuracy by kind")
            print_table([{"kind": k, "accuracy": v} for k, v in s["accuracy_by_kind"].items()])
    write("judge_validation", {"set_size": len(rows), "results": results})


if __name__ == "__main__":
    main()
