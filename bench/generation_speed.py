"""Greedy generation speed on the embedded model by batch size and dtype, against the 2N limit (issue 24 item 2).

Run: .venv/bin/python bench/generation_speed.py [--prompts 64] [--max-new-tokens 64] [--batches 8,16,32,64]
     [--dtypes float32,bfloat16] [--decoders pruned,hf] [--data DIR --patch DIR [--eval-prompts 128]]

The limit: a decoded token costs about 2N FLOPs (N = the model's parameters, the tied embedding
counted once as the output projection), so at the fp32 matmul peak P measured in this run
(2048 x 2048 fp32 matmuls, bench/train_throughput.py's measure) the limit is P / 2N tokens/s.
Each row times ``generation.generate`` (the path evaluation uses: length-sorted, left-padded
batches decoded by the decoder below) on the same prompts (general + borderline
resources), nothing read from the generation cache. Tokens counted: every position each row
decodes until its EOS or the limit (what the hardware computed for kept rows). Greedy outputs
are compared: fp32 at each batch size with fp32 at the smallest batch of ``--batches``
(``ref_batch``: 8 by default), bf16 with fp32 at the same batch size; the share of prompts
whose whole answer is identical, and the share whose first 16 tokens are. Beside each batch
size: the model's linear layers alone at that many rows (:func:`linear_bound`), the ceiling for an engine that computes the same fp32 matmuls.

Decoders (``--decoders``): ``pruned`` is ``decoding.greedy``, the product's greedy path, which
drops a row from the batch once it has stopped; ``hf`` is transformers' ``generate`` on the same
batches (the path before it, which computes every row until the whole batch has stopped), run by
swapping ``decoding.greedy`` for a call of ``generate`` in this process; ``hf-static-compiled``
is ``generate`` with transformers' static KV cache and the model's forward compiled by
``torch.compile`` (inductor, static shapes), the "static KV cache with compilation" issue 24
names (its first call of each batch shape compiles: time each with ``--repeats 2`` or more).
``unshared`` is the product's decoder with every prompt read whole (``prompt_pass.prefill``
before it read a batch's shared prefix once: the system turn of the chat template, a shared
jailbreak opening). ``layer-states-routing`` is the product's decoder with a gated patch's
routing pass as it was before session 44 (``gate.probe.layer_states``: whole prompts in
batches of the generation's batch size) instead of ``gate.probe.route_states``.
``matmul-decode-attention`` is the product's decoder with attention for one query position (a
decode step) computed by plain matmuls instead of transformers' SDPA
(:func:`plain_decode_attention`; the prompt pass unchanged), a candidate measured with its
answer mismatch rate. Each row of another decoder is compared with the ``pruned`` row of the same
dtype and batch (identical answers, share). For ``pruned`` and ``unshared`` rows, ``prompt_tokens``
counts the prompts' own tokens and ``prompt_positions`` the positions their prompt passes computed
(padding and shared tokens read once included). With
``--data`` and ``--patch`` a second workload is timed: the folder's validation harmful prompts
(direct and wrapped, the first ``--eval-prompts``) through that patch as ``eval safety`` routes
them (a gated patch: per prompt), ``max_new_tokens`` 96 as ``EvalConfig``: answers of mixed
lengths (short refusals beside long compliances), where the two decoders differ most. A dtype whose matmul peak is under a quarter of fp32's (bf16
on a CPU without AVX-512-BF16/AMX) is skipped and recorded with the CPU's flags. Prints a table and writes
bench/results/generation_speed.json.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
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


def linear_bound(model, rows: int, reps: int = 10) -> float:
    """Tokens/s of a decode step's matmuls alone: every ``nn.Linear`` of ``model`` (the decoder's
    projections and the output head) applied once to ``rows`` rows of random activations, in
    model order, nothing else (no attention, norms, cache or sampling), best of ``reps`` passes
    after a warm-up. An upper bound on greedy decoding at that batch size for any engine that
    computes these fp32 matmuls: at a few dozen rows they stream every weight (about 540 MB in
    fp32 on the embedded model) for little arithmetic, far from the square-matmul peak."""
    import torch

    ws = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    xs = {w.shape[1]: torch.randn(rows, w.shape[1], dtype=w.dtype) for w in ws}
    f = torch.nn.functional.linear
    best = float("inf")
    with torch.inference_mode():
        for w in ws:
            f(xs[w.shape[1]], w)
        for _ in range(reps):
            t = time.perf_counter()
            for w in ws:
                f(xs[w.shape[1]], w)
            best = min(best, time.perf_counter() - t)
    return rows / best


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
    ap.add_argument("--decoders", default="pruned,hf")
    ap.add_argument("--data", default=None, help="a data folder: also time its validation harmful prompts")
    ap.add_argument("--patch", default=None, help="the patch those prompts go through (with --data)")
    ap.add_argument("--eval-prompts", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1,
                    help="time each (workload, batch) this many times, the decoders interleaved; rows keep the fastest")
    ap.add_argument("--name", default="generation_speed",
                    help="results file name under bench/results/ (default: the recorded generation_speed.json)")
    args = ap.parse_args()
    if (args.data is None) != (args.patch is None):
        ap.error("--data and --patch go together")
    threads = rt.configure_threads()
    batches = sorted({int(x) for x in args.batches.split(",")})  # ascending: the reference batch is timed first
    res = Path(__file__).resolve().parents[1] / "src" / "safety_patch" / "resources"
    texts = [line.split("\t")[-1] for name in ("general_prompts.tsv", "borderline_prompts.tsv")
             for line in (res / name).read_text(encoding="utf-8").splitlines() if line.strip()]
    texts = texts[:: max(1, len(texts) // args.prompts)][: args.prompts]
    convs = [conversation(t) for t in texts]
    peak32 = matmul_peak(torch.float32)
    peak16 = matmul_peak(torch.bfloat16)
    rows, outs, skipped, rows_by, bounds = [], {}, {}, {}, {}
    steps: list[int] = []  # rows x decoding steps each call computed (finished rows included)
    compiled: dict[int, object] = {}  # id(model) -> its compiled forward (hf-static-compiled)
    prompt_positions: list[int] = []  # positions the prompt passes computed (pruned, unshared)
    prompt_tokens: list[int] = []  # the prompts' own tokens (pruned, unshared)

    @contextlib.contextmanager
    def decoder(name: str, batch: int):
        """``decoding.greedy`` as the product runs it (pruned), or replaced by transformers'
        ``generate`` on the same batch (hf); counts the row-steps either computes."""
        from safety_patch import generation, prompt_pass
        from safety_patch.gate import probe

        product = generation.greedy

        def counted(module, ids, mask, max_new_tokens, eos_ids, adapter_names=None):
            # positions the prompt pass computes (every forward that reads more than one position)
            h = module.register_forward_pre_hook(
                lambda _m, _a, kw: prompt_positions.append(kw["input_ids"].numel()) if kw["input_ids"].shape[1] > 1
                else None, with_kwargs=True)
            try:
                new = product(module, ids, mask, max_new_tokens, eos_ids, adapter_names)
            finally:
                h.remove()
            steps.append(sum(len(t) for t in new))
            prompt_tokens.append(int(mask.sum()))
            return new

        def hf(module, ids, mask, max_new_tokens, eos_ids, adapter_names=None, **extra):
            if adapter_names is not None:
                extra["adapter_names"] = list(adapter_names)
            pad = next(iter(eos_ids))
            gen = module.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad,
                                  do_sample=False, temperature=None, top_p=None, top_k=None, **extra)[:, ids.shape[1]:]
            steps.append(gen.numel())
            out = []
            for row in gen.tolist():  # up to and including the first EOS, as greedy returns
                stop = next((k for k, t in enumerate(row) if t in eos_ids), None)
                out.append(row if stop is None else row[: stop + 1])
            return out

        def hf_static_compiled(module, ids, mask, max_new_tokens, eos_ids, adapter_names=None):
            # transformers' static KV cache with the forward compiled by torch.compile (inductor,
            # static shapes: one graph per batch shape), the path the issue names; the first call
            # of each shape pays the compilation, which the row's seconds_each shows
            if id(module) not in compiled:
                compiled[id(module)] = torch.compile(module.forward, dynamic=False)
            eager = module.forward
            module.forward = compiled[id(module)]
            try:
                return hf(module, ids, mask, max_new_tokens, eos_ids, adapter_names, cache_implementation="static")
            finally:
                module.forward = eager

        def matmul_attention(module, ids, mask, max_new_tokens, eos_ids, adapter_names=None):
            # the product's decoder with one-query attention by plain matmuls (plain_decode_attention)
            cfg = module.config
            before = cfg._attn_implementation
            cfg._attn_implementation = register_plain_decode_attention()
            try:
                return counted(module, ids, mask, max_new_tokens, eos_ids, adapter_names)
            finally:
                cfg._attn_implementation = before

        decoders = {"pruned": counted, "unshared": counted, "layer-states-routing": counted, "hf": hf,
                    "hf-static-compiled": hf_static_compiled, "matmul-decode-attention": matmul_attention}
        if name not in decoders:
            raise SystemExit(f"--decoders: unknown decoder {name!r} ({', '.join(decoders)})")
        generation.greedy = decoders[name]
        shared_min, route_states = prompt_pass.SHARED_PREFIX_MIN, probe.route_states
        if name == "unshared":  # the prompt pass before shared tokens were read once
            prompt_pass.SHARED_PREFIX_MIN = 1 << 30
        if name == "layer-states-routing":  # the routing pass before session 44: whole prompts, the generation's batch
            probe.route_states = lambda m, ids, layers, max_batch=0: probe.layer_states(m, tok, ids, layers, batch)
        try:
            yield
        finally:
            generation.greedy = product
            prompt_pass.SHARED_PREFIX_MIN = shared_min
            probe.route_states = route_states
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
        for b in batches:
            tps = linear_bound(lm.model, b)
            bounds[f"{dt}/{b}"] = {"tokens_per_s": round(tps, 1), "pct_of_2N_limit": round(100 * tps / limit, 1)}
            print(f"{dt} batch {b}: the model's linear layers alone {tps:.1f} tokens/s "
                  f"({100 * tps / limit:.1f}% of the 2N limit)", flush=True)
        work = [("general+look-alike", lambda lm=lm: lm.model, convs, args.max_new_tokens)]
        if args.data:  # attached last: attaching hooks the loaded model itself (the base rows need it bare)
            work.append(("val harmful via patch", lambda lm=lm: attached_patch(lm, args.patch),
                         eval_prompts(args.data, args.eval_prompts), 96))
        model, made = None, None
        for (wl, make, cv, max_new), b, rep, dec in itertools.product(
                work, batches, range(args.repeats), args.decoders.split(",")):
            if made != wl:
                model, made = make(), wl
            cfg = GenerationConfig(max_new_tokens=max_new, batch_size=b)
            steps.clear()
            prompt_positions.clear()
            prompt_tokens.clear()
            t0 = time.perf_counter()
            with decoder(dec, b):
                out = generate(model, tok, cv, cfg)
            el = time.perf_counter() - t0
            if rep:  # a repeat: keep the faster time (answers are compared on the first)
                row = rows_by[(wl, dt, b, dec)]
                row["seconds_each"].append(round(el, 1))
                if el < row["seconds"]:
                    row.update(seconds=round(el, 1), tokens_per_s=round(row["tokens"] / el, 1),
                               pct_of_2N_limit=round(100 * row["tokens"] / el / limit, 1))
                if dec != "pruned" and (wl, dt, b, "pruned") in rows_by:
                    row["x_pruned_vs_this"] = round(rows_by[(wl, dt, b, "pruned")]["tokens_per_s"] / row["tokens_per_s"], 2)
                continue
            ids = [tok(o, add_special_tokens=False)["input_ids"] for o in out]
            n_tok = sum(min(len(i) + 1, max_new) for i in ids)  # + the EOS step where it stopped
            outs[(wl, dt, b, dec)] = ids
            row = {"workload": wl, "dtype": dt, "batch": b, "decoder": dec, "prompts": len(cv), "seconds": round(el, 1),
                   "linear_only_pct_of_2N_limit": bounds[f"{dt}/{b}"]["pct_of_2N_limit"],
                   "seconds_each": [round(el, 1)],
                   "tokens": n_tok, "row_steps": sum(steps), "tokens_per_s": round(n_tok / el, 1),
                   **({"prompt_tokens": sum(prompt_tokens), "prompt_positions": sum(prompt_positions)}
                      if prompt_tokens else {}),
                   "pct_of_2N_limit": round(100 * n_tok / el / limit, 1)}
            pr = outs.get((wl, dt, b, "pruned"))
            if dec != "pruned" and pr is not None:
                row["same_answer_as_pruned_pct"] = round(100 * sum(a == r for a, r in zip(ids, pr, strict=True)) / len(ids), 1)
                row["x_pruned_vs_this"] = round(rows_by[(wl, dt, b, "pruned")]["tokens_per_s"] / row["tokens_per_s"], 2)
            rows_by[(wl, dt, b, dec)] = row
            if dec != "pruned":
                rows.append(row)
                print(row, flush=True)
                continue
            ref = outs.get((wl, "float32", b, dec))
            b0 = batches[0]  # the reference: the smallest batch (8 by default, the evaluations' before session 14)
            ref0 = outs.get((wl, "float32", b0, dec))
            if dt == "float32" and b != b0 and ref0 is not None:
                # batch composition changes the last bits of each matmul (padding, shapes): the
                # share of greedy answers identical to the reference batch's
                row["ref_batch"] = b0
                row["same_answer_as_ref_pct"] = round(100 * sum(a == r for a, r in zip(ids, ref0, strict=True)) / len(ids), 1)
                row["same_first16_as_ref_pct"] = round(
                    100 * sum(a[:16] == r[:16] for a, r in zip(ids, ref0, strict=True)) / len(ids), 1)
            if dt != "float32" and ref is not None:
                row["same_answer_pct"] = round(100 * sum(a == r for a, r in zip(ids, ref, strict=True)) / len(ids), 1)
                row["same_first16_pct"] = round(100 * sum(a[:16] == r[:16] for a, r in zip(ids, ref, strict=True)) / len(ids), 1)
            rows.append(row)
            print(row, flush=True)
        del lm
    for r in rows:
        base = {q["batch"]: q["tokens_per_s"] for q in rows if q["dtype"] == "float32" and q["workload"] == r["workload"]
                and q["decoder"] == r["decoder"]}
        r["x_vs_fp32_batch8"] = round(r["tokens_per_s"] / base[min(base)], 2) if base else None
    print_table(rows, ["workload", "dtype", "batch", "decoder", "prompts", "seconds", "tokens", "row_steps",
                       "prompt_tokens", "prompt_positions",
                       "tokens_per_s", "pct_of_2N_limit", "linear_only_pct_of_2N_limit", "x_vs_fp32_batch8", "x_pruned_vs_this",
                       "same_answer_as_pruned_pct", "ref_batch", "same_answer_as_ref_pct"])
    print(f"fp32 matmul peak {peak32:.1f} GFLOP/s, bf16 {peak16:.1f} GFLOP/s; 2N limit at the fp32 peak "
          f"{peak32 * 1e9 / (2 * 134.5e6):.0f} tokens/s; threads {threads}")
    write(args.name, {"prompts": len(convs), "max_new_tokens": args.max_new_tokens, "threads": threads,
                               "matmul_peak_gflops": {"float32": round(peak32, 1), "bfloat16": round(peak16, 1)},
                               "cpu_flags": cpu_flags(), "skipped": skipped, "linear_only_bound": bounds, "rows": rows}, run=(ap, args))


def plain_decode_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Attention for one query position by two plain matmuls and a softmax (a decode step), else
    transformers' SDPA path unchanged. ``query`` [b, heads, q, d], ``key``/``value`` [b, kv_heads, t, d]
    (grouped-query heads read their KV head as rows of one matmul); returns ([b, q, heads, d], None)
    as transformers' attention functions do. A profile put CPU flash attention for one query at
    ~1 ms a layer a step on the embedded model (session 43): per-block overhead."""
    import torch
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if query.shape[2] != 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    b, h, _, d = query.shape
    kvh = key.shape[1]
    q = query.reshape(b, kvh, h // kvh, d)
    s = torch.matmul(q, key.transpose(-1, -2)) * (scaling if scaling is not None else d**-0.5)
    if attention_mask is not None:  # [b, 1, 1, t]: True / 0 where a row attends
        s = s.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool else s + attention_mask
    p = torch.softmax(s, dim=-1, dtype=torch.float32).to(value.dtype)
    return torch.matmul(p, value).reshape(b, h, 1, d).transpose(1, 2).contiguous(), None


def register_plain_decode_attention() -> str:
    """Register :func:`plain_decode_attention` (with SDPA's mask) with transformers; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    name = "bench_plain_decode"
    AttentionInterface.register(name, plain_decode_attention)
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)
    return name


def attached_patch(lm, patch: str):
    """The patch attached for inference (gates route per prompt), as ``eval safety --patch`` does."""
    from safety_patch.patches import attach_for_inference

    return attach_for_inference(lm, [patch])


def eval_prompts(data: str, limit: int) -> list:
    """The first ``limit`` validation harmful prompts of a data folder (direct and wrapped), as evaluations render them."""
    from safety_patch.gate.pool import held_out_prompts

    held = held_out_prompts(data, "val")
    return (held["harmful_direct"] + held["harmful_wrapped"])[:limit]


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
