"""Greedy generation speed on the embedded model by batch size and dtype, against the 2N limit (issue 24 item 2).

Run: .venv/bin/python bench/generation_speed.py [--prompts 64] [--max-new-tokens 64] [--batches 8,16,32,64]
     [--dtypes float32,bfloat16]

The limit: a decoded token costs about 2N FLOPs (N = the model's parameters, the tied embedding
counted once as the output projection), so at the fp32 matmul peak P measured in this run
(2048 x 2048 fp32 matmuls, bench/train_throughput.py's measure) the limit is P / 2N tokens/s.
Each row times ``generation.generate`` (the path evaluation uses, HF ``generate`` with a dynamic
cache, left padding, length-sorted batches) on the same prompts (general + borderline
resources), nothing read from the generation cache. Tokens counted: every position each row
decodes until its EOS or the limit (what the hardware computed for kept rows). Greedy outputs
are compared: fp32 at each batch size with fp32 at batch 8 (the evaluations' default), bf16
with fp32 at the same batch size; the share of prompts whose whole answer is identical, and the
share whose first 16 tokens are. A dtype whose matmul peak is under a quarter of fp32's (bf16
on a CPU without AVX-512-BF16/AMX) is skipped and recorded with the CPU's flags. Prints a table and writes
bench/results/generation_speed.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write  # noqa: E402


def matmul_peak(dtype, n: int = 2048, reps: int = 10, budget_s: float = 5.0) -> float:
    """GFLOP/s of n x n matmuls in ``dtype``: up to ``reps`` after a warm-up, stopping once
    ``budget_s`` has passed (a dtype without a fast kernel, e.g. bf16 on an AVX2-only CPU at
    ~1 GFLOP/s, would otherwise take minutes)."""
    import torch

    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    done, t = 0, time.time()
    while done < reps and (done == 0 or time.time() - t < budget_s):
        a @ b
        done += 1
    return 2 * n**3 * done / (time.time() - t) / 1e9


def main() -> None:
    import torch

    from safety_patch import runtime as rt
    from safety_patch.generation import GenerationConfig, conversation, generate
    from safety_patch.models import load_model

    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="8,16,32,64")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    args = ap.parse_args()
    threads = rt.configure_threads()
    res = Path(__file__).resolve().parents[1] / "src" / "safety_patch" / "resources"
    texts = [line.split("\t")[-1] for name in ("general_prompts.tsv", "borderline_prompts.tsv")
             for line in (res / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = texts[:: max(1, len(texts) // args.prompts)][: args.prompts]
    convs = [conversation(t) for t in texts]
    peak32 = matmul_peak(torch.float32)
    peak16 = matmul_peak(torch.bfloat16)
    rows, outs, skipped = [], {}, {}
    peaks = {"float32": peak32, "bfloat16": peak16}
    for dt in args.dtypes.split(","):
        if dt != "float32" and peaks.get(dt, peak32) < 0.25 * peak32:
            # No fast kernel for this dtype here (bf16 without AVX-512-BF16/AMX): generation
            # would take tens of times longer than fp32 and say nothing about the option.
            skipped[dt] = f"matmul peak {peaks[dt]:.1f} GFLOP/s < 25% of fp32's {peak32:.1f}"
            print(f"skipped {dt}: {skipped[dt]}", flush=True)
            continue
        lm = load_model("default", device="cpu", dtype=dt)
        n_params = sum(p.numel() for p in lm.model.parameters())
        limit = peak32 * 1e9 / (2 * n_params)
        tok = lm.tokenizer
        generate(lm.model, tok, convs[:4], GenerationConfig(max_new_tokens=4, batch_size=4))  # warm-up
        for b in [int(x) for x in args.batches.split(",")]:
            cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, batch_size=b)
            t0 = time.perf_counter()
            out = generate(lm.model, tok, convs, cfg)
            el = time.perf_counter() - t0
            ids = [tok(o, add_special_tokens=False)["input_ids"] for o in out]
            n_tok = sum(min(len(i) + 1, args.max_new_tokens) for i in ids)  # + the EOS step where it stopped
            outs[(dt, b)] = ids
            row = {"dtype": dt, "batch": b, "seconds": round(el, 1), "tokens": n_tok, "tokens_per_s": round(n_tok / el, 1),
                   "pct_of_2N_limit": round(100 * n_tok / el / limit, 1)}
            ref = outs.get(("float32", b))
            b8 = outs.get(("float32", 8))
            if dt == "float32" and b != 8 and b8 is not None:
                # batch composition changes the last bits of each matmul (padding, shapes): the
                # share of greedy answers identical to batch 8's, the evaluations' default
                row["same_answer_as_b8_pct"] = round(100 * sum(a == r for a, r in zip(ids, b8, strict=True)) / len(ids), 1)
                row["same_first16_as_b8_pct"] = round(100 * sum(a[:16] == r[:16] for a, r in zip(ids, b8, strict=True))
                                                      / len(ids), 1)
            if dt != "float32" and ref is not None:
                row["same_answer_pct"] = round(100 * sum(a == r for a, r in zip(ids, ref, strict=True)) / len(ids), 1)
                row["same_first16_pct"] = round(100 * sum(a[:16] == r[:16] for a, r in zip(ids, ref, strict=True)) / len(ids), 1)
            rows.append(row)
            print(row, flush=True)
        del lm
    base = {r["batch"]: r["tokens_per_s"] for r in rows if r["dtype"] == "float32"}
    for r in rows:
        r["x_vs_fp32_batch8"] = round(r["tokens_per_s"] / base[min(base)], 2) if base else None
    print_table(rows)
    print(f"fp32 matmul peak {peak32:.1f} GFLOP/s, bf16 {peak16:.1f} GFLOP/s; 2N limit at the fp32 peak "
          f"{peak32 * 1e9 / (2 * 134.5e6):.0f} tokens/s; threads {threads}")
    write("generation_speed", {"prompts": len(convs), "max_new_tokens": args.max_new_tokens, "threads": threads,
                               "matmul_peak_gflops": {"float32": round(peak32, 1), "bfloat16": round(peak16, 1)},
                               "cpu_flags": cpu_flags(), "skipped": skipped, "rows": rows})


def cpu_flags() -> list[str]:
    """The CPU's vector-matmul flags that decide which dtypes have fast kernels (Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    want = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    have = set(text.split())
    return [f for f in want if f in have]


if __name__ == "__main__":
    main()
