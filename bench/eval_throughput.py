"""Evaluation speed on the embedded model: batched vs one-at-a-time generation, a 100 x 4 safety
evaluation, and GCG time and success per behaviour.

Run: .venv/bin/python bench/eval_throughput.py [--data DIR] [--gcg-behaviours 3] [--gcg-steps 25]

Nothing is read from the generation cache (timings are of real work). Greedy decoding.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=None)
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--gcg-behaviours", type=int, default=3)
    ap.add_argument("--gcg-steps", type=int, default=25)
    args = ap.parse_args()
    from safety_patch.attacks.gcg import GCG, GCGSettings
    from safety_patch.data.build import DataConfig, build
    from safety_patch.evaluation.prompts import harmful_requests
    from safety_patch.evaluation.safety import EvalConfig, run_safety
    from safety_patch.generation import GenerationConfig, conversation, generate
    from safety_patch.judges.keyword import KeywordJudge
    from safety_patch.models import load_model

    lm = load_model("default")
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "d"
        if not args.data:
            build(data, DataConfig(distill=False))
        reqs, templates = harmful_requests(data, limit=args.prompts)

        # 1. batched vs sequential generation on the same 16 prompts
        convs = [conversation(r["request"]) for r in reqs[:16]]
        rows = []
        for bs in (1, 8, 16):
            cfg = GenerationConfig(max_new_tokens=64, batch_size=bs)
            t = time.time()
            outs = generate(lm.model, lm.tokenizer, convs, cfg)
            dt = time.time() - t
            n = sum(len(lm.tokenizer(o, add_special_tokens=False)["input_ids"]) for o in outs)
            rows.append({"batch_size": bs, "seconds": round(dt, 1), "new_tokens": n, "tokens_per_s": round(n / dt, 1)})
        for r in rows:
            r["speedup_vs_batch_1"] = round(r["tokens_per_s"] / rows[0]["tokens_per_s"], 2)
        print_table(rows)

        # 2. a full safety evaluation: N prompts x 4 attacks, generation + judging
        ecfg = EvalConfig(attacks=("direct", "template", "past_tense", "refusal_suppression"), max_new_tokens=64,
                          batch_size=16)
        t = time.time()
        from safety_patch.patched import PatchedModel

        res = run_safety(PatchedModel.base(lm), lm.tokenizer, reqs, templates, ecfg, None, "bench", KeywordJudge())
        eval_s = time.time() - t
        asr = {k: v["value"] for k, v in res["aggregates"]["per_attack"].items()}
        print(f"\n{len(reqs)} prompts x 4 attacks: {eval_s:.0f}s; base ASR per attack: {asr}")

        # 3. GCG on a few behaviours against the base model
        gcg = GCG(GCGSettings(steps=args.gcg_steps, search_width=64, topk=64)).bind(lm, lm.tokenizer)
        judge = KeywordJudge()
        grows = []
        for r in reqs[: args.gcg_behaviours]:
            a = gcg.apply(r["request"])
            ans = generate(lm.model, lm.tokenizer, [a.messages], GenerationConfig(max_new_tokens=64, batch_size=1))[0]
            direct = generate(lm.model, lm.tokenizer, [conversation(r["request"])], GenerationConfig(max_new_tokens=64))[0]
            grows.append({"behavior": r["behavior_id"][:28], "seconds": a.extra["seconds"], "steps": a.extra["steps"],
                          "loss": round(a.extra["loss"], 3), "direct_complied": judge.verdict(direct).complied,
                          "gcg_complied": judge.verdict(ans).complied, "starts_with_target": ans.lower().startswith("sure, here")})
        print()
        print_table(grows)
    write("eval_throughput", {"generation": rows, "safety_eval": {"prompts": len(reqs), "attacks": 4,
                              "seconds": round(eval_s, 1), "asr": asr}, "gcg": grows,
                              "gcg_settings": {"steps": args.gcg_steps, "search_width": 64, "topk": 64}}, run=(ap, args))


if __name__ == "__main__":
    main()
