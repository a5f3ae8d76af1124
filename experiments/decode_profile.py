"""Where a decode step's time goes on a GPU (issue 24 item 7: "a decode step costs 50-80 ms
whatever the batch or model size").

On one randomly initialised Llama (bench/scale.py's shapes), greedy decoding of 8 prompts:
ms per step of the project's own loop (``generation.generate``) against transformers'
``model.generate(do_sample=False)`` on the same inputs, with its dynamic and with a static KV
cache (compiled by transformers on a GPU), each from the difference between 64 and 16 new tokens
(prefill cancels out); how many of the 8 answers' first 32 tokens the static cache and our loop
share with the dynamic one; then a torch.profiler table of the project's loop.
A diagnosis, not a benchmark: it prints and writes ``experiments/results/decode_profile.json``.

    python experiments/decode_profile.py --size 1b --tokenizer .scale-inputs/tokenizer
    python experiments/decode_profile.py --size tiny --device cpu        # dry run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="1b")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--tokenizer", default=None, help="a saved tokenizer folder (default: a tiny one)")
    ap.add_argument("--out", default=str(ROOT / "experiments" / "results" / "decode_profile.json"))
    args = ap.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from safety_patch import runtime
    from safety_patch.generation import GenerationConfig, conversation, generate, render
    from scale import SHAPES

    rt = runtime.resolve(args.device, "auto")
    if args.tokenizer:
        tok = AutoTokenizer.from_pretrained(args.tokenizer)
    else:
        from safety_patch.testing import tiny_tokenizer

        tok = tiny_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                      eos_token_id=None, **SHAPES[args.size])
    torch.manual_seed(0)
    with rt.device:
        model = AutoModelForCausalLM.from_config(cfg, dtype=rt.dtype).eval()
    prompts = [conversation(f"Write a short story about a lighthouse keeper, part {i}.") for i in range(8)]
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)

    def ours(n: int) -> float:
        sync()
        t = time.perf_counter()
        generate(model, tok, prompts, GenerationConfig(max_new_tokens=n, batch_size=8))
        sync()
        return time.perf_counter() - t

    enc = tok([render(tok, p) for p in prompts], return_tensors="pt", padding=True, padding_side="left").to(rt.device)

    def hf(n: int) -> float:
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=tok.pad_token_id)
        sync()
        return time.perf_counter() - t

    def hf_static(n: int) -> float:
        # A static KV cache: on a GPU transformers compiles the decode step (CUDA graphs), the
        # candidate cure for a host-bound step; on a CPU it runs uncompiled (the dry run).
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(**enc, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=tok.pad_token_id,
                           cache_implementation="static")
        sync()
        return time.perf_counter() - t

    out: dict = {"size": args.size, "device": rt.device.type, "dtype": str(rt.dtype)}
    for name, fn in (("ours", ours), ("transformers_generate", hf), ("transformers_static_cache", hf_static)):
        t = time.perf_counter()
        fn(16), fn(64)  # warm-up, both lengths (a static cache's shape, so its compiled graph, depends on it)
        out[f"{name}_warmup_s"] = round(time.perf_counter() - t, 1)
        out[f"{name}_ms_per_step"] = round(1000 * (fn(64) - fn(16)) / 48, 2)
    # Would a static-cache path answer as ours does? The 8 answers' 32 greedy tokens, token for token.
    with torch.no_grad():
        n_new, start = 32, enc["input_ids"].shape[1]
        dyn = model.generate(**enc, do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=tok.pad_token_id)
        sta = model.generate(**enc, do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new, pad_token_id=tok.pad_token_id,
                             cache_implementation="static")
    mine = generate(model, tok, prompts, GenerationConfig(max_new_tokens=n_new, batch_size=8))
    as_text = [tok.decode(r[start:], skip_special_tokens=True) for r in dyn]
    out["static_equals_dynamic_rows"] = int(sum(torch.equal(a[start:], b[start:]) for a, b in zip(dyn, sta, strict=True)))
    out["ours_equals_dynamic_rows"] = int(sum(a.strip() == b.strip() for a, b in zip(mine, as_text, strict=True)))  # ours strips answers
    out["rows"] = len(prompts)
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if rt.device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        ours(16)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    print(table)
    out["profile_top"] = table
    print(json.dumps({k: v for k, v in out.items() if k != "profile_top"}))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
