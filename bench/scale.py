"""At users' scale: load, generate, LoRA and full-parameter training on Llama-shaped models (issue 24 item 7).

Run on a GPU:   .venv/bin/python bench/scale.py [--sizes 1b,8b] [--peak-tflops 989]
Dry run (CPU):  .venv/bin/python bench/scale.py --tiny

Each size is a randomly initialised Llama (Llama-3.2-1B / Llama-3.1-8B shapes, the embedded
model's tokenizer and its 49,152-token vocabulary) saved as a local folder, then driven through
the project's own API exactly as a user's run would be:

* **first load**: ``models.load_model`` on the folder, with the share of it spent computing the
  base fingerprint (timed again on its own);
* **generation**: 32 prompts x 128 new tokens (greedy) at batch 8 (the evaluations' default) and
  32, new tokens per second;
* **LoRA** ``train --recipe paper`` and **full-parameter** ``train --recipe full-safety`` on a
  data folder built without a model (refusals only): tokens/s as ``patch.json`` reports it and in
  the steady state (``metrics.jsonl`` after the first steps), MFU = 6 N tokens/s over
  ``--peak-tflops``, peak accelerator memory, the patch's size on disk, and whether it was written.

Prints a table and writes ``bench/results/scale.json`` (``--tiny``: ``scale_tiny.json``) with the
machine facts. The issue's bars (LoRA MFU >= 40% at 8B; full-parameter 8B writes its patch on a
64 GB disk; generation >= 10x the first measurement at batch 32; first load of 8B <= 15 s) are
checked in the ``bars`` section of the JSON where the sizes were run.
"""

from __future__ import annotations

import argparse
import json
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


def make_model(size: str, where: Path, dtype: torch.dtype) -> Path:
    """A randomly initialised Llama of ``size`` with the embedded model's tokenizer, saved at ``where``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    if size == "tiny":  # the dry run needs no embedded model (and no GGUF conversion)
        from safety_patch.testing import tiny_tokenizer

        tok = tiny_tokenizer()
    else:
        from safety_patch.models import load_model

        tok = load_model("default", device="cpu").tokenizer
    # No EOS: random weights would stop at random places; every prompt generates exactly --new-tokens.
    cfg = LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, rope_theta=500000.0,
                      bos_token_id=tok.bos_token_id, eos_token_id=None, **SHAPES[size])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    model.save_pretrained(str(where), safe_serialization=True)
    tok.save_pretrained(str(where))
    del model
    return where


def data_folder(where: Path) -> Path:
    """A data folder without self-distillation (no model needed): refusal rows only."""
    from safety_patch.data.build import DataConfig, build

    build(where, DataConfig(distill=False, self_instruct=0, max_per_source=120))
    return where


def _steady_tps(patch: Path, skip: int = 5) -> float | None:
    """Tokens/s between the ``skip``-th logged step and the last (the first steps include warm-up)."""
    rows = [json.loads(x) for x in (patch / "metrics.jsonl").read_text().splitlines() if x.strip()] \
        if (patch / "metrics.jsonl").is_file() else []
    rows = [r for r in rows if "tokens" in r and "seconds" in r]
    if len(rows) <= skip:
        return None
    a, b = rows[skip], rows[-1]
    return (b["tokens"] - a["tokens"]) / (b["seconds"] - a["seconds"]) if b["seconds"] > a["seconds"] else None


def _disk_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


def run_size(size: str, work: Path, args) -> dict:
    from safety_patch import runtime
    from safety_patch.fingerprint import fingerprint
    from safety_patch.generation import GenerationConfig, conversation, generate
    from safety_patch.models import load_model
    from safety_patch.train.api import resolve_config
    from safety_patch.train.run import train

    rt = runtime.resolve(args.device, "auto")
    row: dict = {"size": size, "device": rt.device.type, "dtype": str(rt.dtype).removeprefix("torch.")}
    folder = make_model(size, work / f"llama-{size}", rt.dtype)
    t = time.time()
    lm = load_model(str(folder), device=args.device)
    row["first_load_s"] = round(time.time() - t, 2)
    t = time.time()
    fingerprint(lm.model, lm.tokenizer)
    row["fingerprint_share"] = round(min((time.time() - t) / max(row["first_load_s"], 1e-9), 1.0), 3)
    n_params = sum(p.numel() for p in lm.model.parameters())
    row["params_m"] = round(n_params / 1e6, 1)

    prompts = [conversation(f"Write a short story about a lighthouse keeper, part {i}.") for i in range(args.prompts)]
    for bs in (8, 32):
        cfg = GenerationConfig(max_new_tokens=args.new_tokens, batch_size=bs)
        t = time.time()
        generate(lm.model, lm.tokenizer, prompts, cfg)
        dt = time.time() - t
        row[f"gen_tps_b{bs}"] = round(len(prompts) * args.new_tokens / dt, 1)  # no EOS: every row runs to the end
    del lm
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    data = data_folder(work / "data")
    for arm, recipe in (("lora", "paper"), ("full", "full-safety")):
        if arm in args.skip:
            continue
        out = work / f"patch-{size}-{arm}"
        # recomputation off unless asked: the first H200 measurement ran without it, and MFU here
        # counts 6N per token, which a recomputed forward would not show (train's default is on)
        cfg = resolve_config(recipe, None, {"data.max_train_rows": args.rows, "data.max_seq_len": 512,
                                            "optim.batch_size": args.batch_size,
                                            "optim.gradient_checkpointing": args.recompute})
        try:
            meta = train(data, out, cfg, model=str(folder), device=args.device, progress=False, overwrite=True)
        except Exception as e:  # a full-parameter 8B run that cannot write its patch is a measured result
            row[f"{arm}_error"] = f"{type(e).__name__}: {str(e)[:160]}"
            continue
        tr = meta["training"]
        row[f"{arm}_tps"] = tr["tokens_per_s"]
        steady = _steady_tps(out)
        row[f"{arm}_tps_steady"] = round(steady, 1) if steady else None
        if steady:
            row[f"{arm}_mfu"] = round(6 * n_params * steady / (args.peak_tflops * 1e12), 4)
        row[f"{arm}_peak_mem_gb"] = round(tr["peak_memory_mb"] / 1024, 2)
        row[f"{arm}_patch_mb"] = round(_disk_mb(out), 2)
        row[f"{arm}_written"] = (out / "patch.json").is_file()
        shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(folder, ignore_errors=True)
    return row


def bars(rows: list[dict]) -> dict:
    """The issue's targets, for the sizes that ran: True / False / None (not measured)."""
    by = {r["size"]: r for r in rows}
    out = {}
    if "8b" in by:
        r = by["8b"]
        out["lora_mfu_8b_ge_0.40"] = r.get("lora_mfu") is not None and r["lora_mfu"] >= 0.40
        out["full_8b_patch_written"] = bool(r.get("full_written"))
        out["first_load_8b_le_15s"] = r["first_load_s"] <= 15
    for size, first in FIRST.items():
        if size in by:
            out[f"generation_{size}_b32_ge_10x_first"] = by[size]["gen_tps_b32"] >= 10 * first["gen_tps_b32"]
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1b,8b", help="comma list of 1b, 8b")
    ap.add_argument("--tiny", action="store_true", help="a CPU dry run on a tiny model (sizes: tiny)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="the accelerator's dense bf16 peak (H100/H200 SXM: 989)")
    ap.add_argument("--rows", type=int, default=256, help="training rows per arm")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--recompute", action="store_true", help="activation recomputation on (train's default; off here)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--skip", default="", help="arms to skip: lora, full")
    ap.add_argument("--work", default=None, help="work folder (default: a temporary one, removed afterwards)")
    ap.add_argument("--results", default=None, help="results name under bench/results (default scale / scale_tiny)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.sizes, args.device, args.rows, args.prompts, args.new_tokens = "tiny", "cpu", 8, 4, 8
        args.batch_size = 4
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    bad = [s for s in sizes if s not in SHAPES]
    if bad:
        ap.error(f"unknown size {bad[0]!r}; valid: {', '.join(SHAPES)}")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="scale-"))
    try:
        rows = [run_size(s, work, args) for s in sizes]
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print_table(rows)
    payload = {"rows": rows, "bars": bars(rows), "args": vars(args)}
    # --tiny sets the sizes it runs at: those are the mode, not arguments changed by hand
    tiny = ("sizes", "device", "rows", "prompts", "new_tokens", "batch_size") if args.tiny else ()
    write(args.results or ("scale_tiny" if args.tiny else "scale"), payload, run=(ap, args), modes=("tiny", *tiny))
    return payload


if __name__ == "__main__":
    main()
