"""Capability-suite cost on the default model: the offline suite's time, and NLL/KL scoring
throughput (batched, length-sorted) against a naive one-example-at-a-time loop.

Run: .venv/bin/python bench/capability_speed.py --data DIR [--patch P]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--patch", default=None)
    ap.add_argument("--humaneval-limit", type=int, default=20)
    args = ap.parse_args()
    from safety_patch.evaluation.capability import (
        CapabilityConfig,
        _encode_pairs,
        answer_logprobs,
        evaluate_capability,
        reference_pairs,
    )
    from safety_patch.models import load_model

    lm = load_model("default")
    pairs = reference_pairs(args.data)
    enc = _encode_pairs(lm.tokenizer, pairs, 512)
    ntok = sum(len(e[0]) for e in enc)
    t = time.time()
    answer_logprobs(lm.model, lm.tokenizer, enc, batch_size=8)
    batched = time.time() - t
    t = time.time()
    for e in enc:
        answer_logprobs(lm.model, lm.tokenizer, [e], batch_size=1)
    naive = time.time() - t
    rows = [{"scoring": "naive per-example loop", "seconds": round(naive, 1), "tokens_per_s": round(ntok / naive, 1)},
            {"scoring": "batched (8, length-sorted)", "seconds": round(batched, 1), "tokens_per_s": round(ntok / batched, 1)}]
    print_table(rows)
    del lm
    cfg = CapabilityConfig(humaneval_limit=args.humaneval_limit)
    t = time.time()
    res = evaluate_capability("default", [args.patch] if args.patch else [], args.data, cfg, use_cache=False)
    suite = time.time() - t
    print(f"\noffline suite ({', '.join(cfg.tasks)}; HumanEval {args.humaneval_limit} tasks; "
          f"{'base + patched' if args.patch else 'base only'}): {suite:.0f}s")
    write("capability_speed", {"scoring": rows, "scoring_tokens": ntok, "suite_seconds": round(suite, 1),
                               "suite_runs": list(res["runs"]), "humaneval_limit": args.humaneval_limit,
                               "results": {k: {m: v.get("value") if isinstance(v, dict) else v for m, v in r.items()}
                                           for k, r in res["runs"].items()}}, run=(ap, args))


if __name__ == "__main__":
    main()
