"""Sampling speed on the embedded model: the product's sampler against transformers' ``generate`` (issue 24 items 2 and 4).

Run: .venv/bin/python bench/sampling_speed.py [--prompts 160] [--batch 32] [--max-new-tokens 64] [--repeats 2]

The workload is `data build`'s self-written requests: the base model continues an open user turn
from a generic opener (data/selfinstruct.py), with its settings (temperature 1, top-p 0.95, the
model card's top-k, i.e. transformers' default 50, batch 32, 64 new tokens) and the seed of its
first round. Two arms, in one process, interleaved ``--repeats`` times (each keeps its fastest):

* ``generate``: transformers' ``generate(do_sample=True)`` on each batch, handed a cache that
  grows in place (``prompt_pass.growing_cache``), as `data build` sampled before 2026-12-02;
* ``sample``: ``decoding.sample``, the product's path: the same warpers and draws, finished
  rows leave the batch, top-p without a sort of the vocabulary.

Both run through ``generation.complete_texts`` (the first by making ``sampling_warpers`` return
None, the fallback the product takes for a model card it cannot match). The answers must be
identical (the share is printed and written): the sampler is only worth having if a seed draws
what it drew. Tokens counted: each row's new tokens up to and including its EOS. Prints a table
and writes bench/results/sampling_speed.json.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write  # noqa: E402


def main() -> None:
    from safety_patch import generation
    from safety_patch import runtime as rt
    from safety_patch.data.selfinstruct import OPENERS, user_turn_prefix
    from safety_patch.models import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=160)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--seed", type=int, default=1, help="the data build's seed (its first round samples with seed x 1000)")
    args = ap.parse_args()
    threads = rt.configure_threads()
    lm = load_model("default", device="cpu")
    rng = random.Random(args.seed)
    prefix = user_turn_prefix(lm.tokenizer)
    texts = [prefix + rng.choice(OPENERS) for _ in range(args.prompts)]
    cfg = generation.GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=0.95,
                                      batch_size=args.batch, seed=args.seed * 1000)
    product = generation.sampling_warpers
    arms = {"generate": lambda *a: None, "sample": product}
    best: dict[str, float] = {}
    each: dict[str, list[float]] = {}
    outs: dict[str, list] = {}
    try:
        for rep in range(args.repeats):
            for name, warpers in arms.items():
                generation.sampling_warpers = warpers
                t0 = time.perf_counter()
                out = generation.complete_texts(lm.model, lm.tokenizer, texts, cfg)
                el = time.perf_counter() - t0
                each.setdefault(name, []).append(round(el, 1))
                best[name] = min(best.get(name, el), el)
                outs.setdefault(name, out)
                print(f"{name} run {rep + 1}: {el:.1f} s", flush=True)
    finally:
        generation.sampling_warpers = product
    tokens = sum(min(len(lm.tokenizer(t, add_special_tokens=False)["input_ids"]) + int(stop), args.max_new_tokens)
                 for t, stop in outs["sample"])
    same = sum(a == b for a, b in zip(outs["generate"], outs["sample"], strict=True))
    rows = [{"arm": name, "prompts": len(texts), "batch": args.batch, "seconds": round(best[name], 1),
             "seconds_each": each[name], "tokens": tokens, "tokens_per_s": round(tokens / best[name], 1),
             "x_vs_generate": round(best["generate"] / best[name], 2),
             "same_as_generate_pct": round(100 * same / len(texts), 1)} for name in arms]
    print_table(rows, ["arm", "prompts", "batch", "seconds", "tokens", "tokens_per_s", "x_vs_generate",
                       "same_as_generate_pct"])
    print(f"threads {threads}; identical samples {same}/{len(texts)}")
    write("sampling_speed", {"prompts": len(texts), "max_new_tokens": args.max_new_tokens, "threads": threads,
                             "seed": args.seed, "rows": rows}, run=(ap, args))


if __name__ == "__main__":
    main()
