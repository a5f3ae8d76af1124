"""GCG seconds per step: nanoGCG 0.3.0 as the project ran it before (prefix cache off, the
vocabulary head on every position) vs this project's ``_nano_gcg`` (a copied prefix KV cache per
forward, logits at the target only), same behaviours, same settings, same seed, in one run.

Run: .venv/bin/python bench/gcg_speed.py --data DIR [--behaviours 2] [--steps 5] [--width 64]

Per behaviour the two optimisers run one after the other, the order alternating between
behaviours (the machine drifts). Both search the embedded base model on exactly the ids the
evaluation sends (attacks/gcg.py); the table says whether they reached the same suffix and
loss. Nothing is cached.
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
    ap.add_argument("--data", required=True, help="a data folder (its validation split's behaviours are used)")
    ap.add_argument("--behaviours", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--width", type=int, default=64)
    args = ap.parse_args()
    from safety_patch.runtime import configure_threads

    threads = configure_threads()
    import nanogcg
    import torch
    from nanogcg.gcg import GCG as NanoGCG

    from safety_patch.attacks.gcg import GCG, _ExactPromptTokenizer, _nano_gcg
    from safety_patch.evaluation.prompts import harmful_requests
    from safety_patch.models import load_model

    lm = load_model("default")
    reqs, _ = harmful_requests(args.data, split="val", limit=args.behaviours)
    attack = GCG().bind(lm, lm.tokenizer)
    rows, runs = [], []
    for i, r in enumerate(reqs):
        messages = attack._messages(r["request"], "{optim_str}")
        exact = _ExactPromptTokenizer(lm.tokenizer, messages)
        n_prompt = len(attack.evaluated_ids(r["request"], " " + " ".join(["!"] * 20)))
        out = {}
        for arm in (("before", "now") if i % 2 == 0 else ("now", "before")):
            cfg = nanogcg.GCGConfig(num_steps=args.steps, search_width=args.width, topk=64, seed=0, verbosity="ERROR",
                                    optim_str_init=" " + " ".join(["!"] * 20), early_stop=False,
                                    use_prefix_cache=arm == "now")
            gcg = NanoGCG(lm.model, exact, cfg) if arm == "before" else _nano_gcg(lm.model, exact, cfg)
            torch.manual_seed(0)
            t = time.perf_counter()
            res = gcg.run(messages, attack.settings.target)
            out[arm] = {"seconds": time.perf_counter() - t, "best": res.best_string, "loss": float(res.best_loss)}
        runs.append({"request": r["request"], "prompt_tokens": n_prompt, **out})
        rows.append({"behaviour": i, "prompt tokens": n_prompt, "before s/step": round(out["before"]["seconds"] / args.steps, 2),
                     "now s/step": round(out["now"]["seconds"] / args.steps, 2),
                     "speedup": round(out["before"]["seconds"] / out["now"]["seconds"], 2),
                     "same suffix": out["before"]["best"] == out["now"]["best"],
                     "loss diff": f"{abs(out['before']['loss'] - out['now']['loss']):.1e}"})
    total = {arm: sum(x[arm]["seconds"] for x in runs) for arm in ("before", "now")}
    print_table(rows)
    print(f"\nall behaviours: {total['before']:.1f} s before vs {total['now']:.1f} s now ({total['before'] / total['now']:.2f}x), "
          f"{threads} threads")
    write("gcg_speed", {"settings": {"steps": args.steps, "search_width": args.width, "topk": 64, "suffix_tokens": 20},
                        "threads": threads, "speedup": total["before"] / total["now"], "runs": runs}, run=(ap, args))


if __name__ == "__main__":
    main()
