"""Training throughput: `safety-patch train` vs a plain TRL SFTTrainer + PEFT script, same data and model.

Run: .venv/bin/python bench/train_throughput.py [--rows 96] [--model default]

Both arms train LoRA r8 (all linear layers) for one epoch on the same safety conversations
in TRL's prompt/completion format. The baseline keeps TRL's defaults (random batches padded
to the longest row, activation checkpointing on, max_length 1024); ours groups batches by
length, skips recomputation and drops rows longer than the sequence limit (none are here).
Tokens/s counts non-padding tokens. MFU = 6 x (matmul parameters) x tokens/s over the fp32
matmul peak measured in the same run (the 6N convention; LoRA's frozen weights skip their
weight gradients, so the true work is nearer 4N and this MFU is an upper estimate).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write  # noqa: E402


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.time()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.time() - t) / 1e9


def plain_trl(model_spec: str, rows: list[dict], work: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from safety_patch.models import load_model

    lm = load_model(model_spec)
    args = SFTConfig(output_dir=str(work / "plain"), num_train_epochs=1, report_to="none", save_strategy="no",
                     include_num_input_tokens_seen="non_padding", use_cpu=not torch.cuda.is_available(), seed=0,
                     logging_steps=1000)
    tr = SFTTrainer(model=lm.model, args=args, train_dataset=Dataset.from_list(rows), processing_class=lm.tokenizer,
                    peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    t = time.time()
    tr.train()
    wall = time.time() - t
    return {"tokens": int(tr.state.num_input_tokens_seen), "seconds": wall, "steps": tr.state.global_step}


def ours(model_spec: str, data_dir: Path, n_rows: int, work: Path) -> dict:
    from safety_patch.train.config import TrainConfig
    from safety_patch.train.run import train

    cfg = TrainConfig(recipe="paper", method="lora", rank=8, alpha=16.0, lr=2e-4, max_train_rows=n_rows, save_steps=10**6)
    meta = train(data_dir, work / "ours", cfg, model=model_spec, progress=False)
    t = meta["training"]
    return {"tokens": t["tokens_seen"], "seconds": t["wall_seconds"], "steps": t["steps"],
            "dropped": meta["data"]["rows"].get("dropped_too_long", 0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default=None, help="a data folder (default: build one without distillation)")
    args = ap.parse_args()
    from safety_patch.data.build import DataConfig, build
    from safety_patch.models import load_model
    from safety_patch.train.config import TrainConfig
    from safety_patch.train.data import training_rows

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_dir = Path(args.data) if args.data else work / "data"
        if not args.data:
            build(data_dir, DataConfig(distill=False))
        rows, _ = training_rows(data_dir, TrainConfig(max_train_rows=args.rows))
        lm = load_model(args.model)
        n_matmul = sum(m.weight.numel() for m in lm.model.modules() if isinstance(m, torch.nn.Linear))
        del lm
        peak = matmul_peak()
        base = plain_trl(args.model, rows, work)
        mine = ours(args.model, data_dir, args.rows, work)
    out = []
    for name, r in (("plain TRL + PEFT (defaults)", base), ("safety-patch train", mine)):
        tps = r["tokens"] / r["seconds"]
        out.append({"arm": name, "steps": r["steps"], "tokens": r["tokens"], "seconds": round(r["seconds"], 1),
                    "tokens_per_s": round(tps, 1), "mfu": round(6 * n_matmul * tps / (peak * 1e9), 4)})
    ratio = out[1]["tokens_per_s"] / out[0]["tokens_per_s"]
    print_table(out)
    print(f"\nratio (ours / plain): {ratio:.2f}x   fp32 matmul peak: {peak:.1f} GFLOP/s   matmul params: {n_matmul:,}")
    write("train_throughput", {"rows": out, "ratio": ratio, "matmul_peak_gflops": peak, "matmul_parameters": n_matmul,
                               "n_rows": args.rows, "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
