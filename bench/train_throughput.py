"""Training throughput: `safety-patch train` vs a plain TRL SFTTrainer + PEFT script, same data and model.

Run: .venv/bin/python bench/train_throughput.py [--rows 96] [--model default]
(default arms: ``plain-fp32`` and ``ours-mb1-mimalloc``, what the CLI runs; ``--arms`` for others)

Both arms train LoRA r8 (all linear layers) for one epoch on the same safety conversations
in TRL's prompt/completion format. The baseline keeps TRL's defaults (random batches padded
to the longest row, activation checkpointing on, max_length 1024); ours groups batches by
length, skips recomputation and drops rows longer than the sequence limit (none are here).
Tokens/s counts non-padding tokens. MFU = 6 x (matmul parameters) x tokens/s over the fp32
matmul peak measured in the same run (the 6N convention; LoRA's frozen weights skip their
weight gradients, so the true work is nearer 4N and this MFU is an upper estimate).

Each arm runs in its own process, so each reports its own peak RSS (VmHWM: model load and
training; one arm's peak cannot hide another's). Arms: ``plain`` (TRL + PEFT, TRL's defaults,
which on a CPU include bf16 autocast), ``ours`` (``safety-patch train --recipe paper``: the
default recipe's adapter training without its gate fit, sequences up to 1024 tokens so that
every row of the baseline trains; the head applied to supervised positions only, in chunks,
train/loss.py) and ``ours-full-logits`` (the same with the previous full-logits loss, which is
what `train` ran before); ``ours-bf16`` (ours under bf16 autocast like the baseline: measured,
not adopted) runs when asked. ``plain-fp32`` is the baseline with only its precision matched
to ours: TRL 1.16 turns bf16 on by default even on a CPU, and on a CPU without bf16 matmul
units (AVX2 only) that runs at ~1 GFLOP/s, so a ratio against ``plain`` there measures TRL's
default, not our trainer. ``ours-recompute`` (activation recomputation), ``ours-mmap`` (glibc's
mmap threshold pinned, allocator.fix_mmap_threshold) and ``ours-recompute-mmap`` (both: the CLI's
fallback without mimalloc), ``ours-mimalloc`` and ``ours-recompute-mimalloc`` (mimalloc
preloaded: what the ``safety-patch`` command runs, allocator.py) measure the memory levers; ``ours``
is the trainer before (no recomputation, glibc as it comes); each arm reports a hash of its trained adapter, so
levers that must not change the numerics are checked to train the same bits.
``ours-mb1-mimalloc`` (any arm with ``mbN``) runs each batch in passes of N rows
(``optim.micro_batch_size``; the others pass a batch at once): the same rows per step, the loss
normalised over the whole batch. Since session 28 the CLI's default on a CPU is
``ours-mb1-mimalloc``: passes of one row, no recomputation, mimalloc. ``--arms`` picks them; ``--threads`` sets torch's threads in each.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write  # noqa: E402

CLI_ARM = "ours-mb1-mimalloc"
"""The arm that trains as ``safety-patch train`` does on a CPU (passes of one row, no
recomputation, mimalloc preloaded): the default, beside ``plain-fp32``."""


def matmul_peak(n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    t = time.time()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.time() - t) / 1e9


def plain_trl(model_spec: str, rows: list[dict], work: Path, fp32: bool = False) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from safety_patch.models import load_model

    lm = load_model(model_spec)
    args = SFTConfig(output_dir=str(work / "plain"), num_train_epochs=1, report_to="none", save_strategy="no",
                     disable_tqdm=True,
                     include_num_input_tokens_seen="non_padding", use_cpu=not torch.cuda.is_available(), seed=0,
                     logging_steps=1000, **({"bf16": False} if fp32 else {}))
    tr = SFTTrainer(model=lm.model, args=args, train_dataset=Dataset.from_list(rows), processing_class=lm.tokenizer,
                    peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    t = time.time()
    tr.train()
    wall = time.time() - t
    return {"tokens": int(tr.state.num_input_tokens_seen), "seconds": wall, "steps": tr.state.global_step}


RECIPE = {"name": "paper", "set": {}}  # --recipe / --set, passed on to each arm's process
KEEP = {"dir": None}  # --keep: where each arm's trained patch is copied


def _config(n_rows: int, extra: dict | None = None):
    from safety_patch.train.api import resolve_config

    # the paper's LoRA (r 8, alpha 16, lr 2e-4, no gate), or --recipe's with its gate off
    return resolve_config(RECIPE["name"], None, {"data.max_train_rows": n_rows, "optim.save_steps": 10**6, "gate": None,
                                                 **RECIPE["set"], **(extra or {})})


def _full_logits_trainer() -> None:
    """Make `train` use the trainer's previous full-logits loss (chunked_loss=False)."""
    from safety_patch.train import anchor

    make = anchor.make_anchored_trainer

    def legacy(base_cls):
        cls = make(base_cls)

        class FullLogits(cls):
            def __init__(self, *a, **kw):
                super().__init__(*a, **{**kw, "chunked_loss": False})

        return FullLogits

    anchor.make_anchored_trainer = legacy


def _bf16_autocast() -> None:
    """Make `train` run under bf16 autocast (fp32 weights and optimiser), as TRL's default does:
    a lever measured here, not adopted (it changes the numerics of every patch)."""
    from safety_patch.train import trl_configs

    init = trl_configs.PatchSFTConfig.__init__

    def bf16_init(self, *a, **kw):
        init(self, *a, **{**kw, "bf16": True})

    trl_configs.PatchSFTConfig.__init__ = bf16_init


def ours(model_spec: str, data_dir: Path, n_rows: int, work: Path, extra: dict | None = None) -> dict:
    from safety_patch.train.run import train

    meta = train(data_dir, work / "ours", _config(n_rows, extra), model=model_spec, progress=False)
    t = meta["training"]
    return {"tokens": t["tokens_seen"], "seconds": t["wall_seconds"], "steps": t["steps"],
            "adapter_sha256": _adapter_hash(work / "ours"),
            "dropped": meta["data"]["rows"].get("dropped_too_long", 0)}


def _adapter_hash(patch_dir: Path) -> str | None:
    """SHA-256 over the trained tensors (names and bytes, sorted): equal hashes mean arms trained
    bit-identical adapters (recomputation and the allocator must not change the numerics)."""
    import hashlib

    from safetensors.torch import load_file

    files = sorted(patch_dir.rglob("*.safetensors"))
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        for name, t in sorted(load_file(f).items()):
            h.update(name.encode())
            h.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _peak_rss_mb() -> float:
    """This process's peak resident set (VmHWM), in MB; ru_maxrss where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _micro_batch(arm: str) -> int | None:
    """``ours-mb4...``: the arm runs each optimiser step's rows in passes of 4 (None: one pass)."""
    for part in arm.split("-"):
        if part.startswith("mb") and part[2:].isdigit():
            return int(part[2:])
    return None


def run_arm(arm: str, model_spec: str, data_dir: Path, n_rows: int, out: Path) -> None:
    """One arm, in this (child) process; writes its figures and peak RSS to ``out``."""
    from safety_patch.train.data import training_rows

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if arm in ("plain", "plain-fp32"):
            rows, _ = training_rows(data_dir, _config(n_rows))
            r = plain_trl(model_spec, rows, work, fp32=arm == "plain-fp32")
        else:
            if arm == "ours-full-logits":
                _full_logits_trainer()
            if arm == "ours-bf16":
                _bf16_autocast()
            # explicit either way: recomputation's config default changed twice (on in sessions 17-27,
            # unset since 28: off on a CPU), and so did the pass size (one row on a CPU since 28)
            extra = {"optim.gradient_checkpointing": "recompute" in arm}
            # passes of N rows for an mbN arm (the CLI's default on a CPU: 1), else one pass per batch
            micro = _micro_batch(arm)
            extra["optim.micro_batch_size"] = micro or _config(n_rows).optim.batch_size
            from safety_patch.allocator import loaded_mimalloc

            # the parent preloaded mimalloc (LD_PRELOAD) for these arms only, as the CLI does
            assert loaded_mimalloc() == ("mimalloc" in arm), arm
            if "mmap" in arm:
                from safety_patch.allocator import fix_mmap_threshold

                assert fix_mmap_threshold()
            r = ours(model_spec, data_dir, n_rows, work, extra)
            if KEEP["dir"]:  # the trained adapter, for comparing arms' weights afterwards
                import shutil

                shutil.copytree(work / "ours", Path(KEEP["dir"]) / arm, dirs_exist_ok=True)
    r["peak_rss_mb"] = round(_peak_rss_mb(), 1)
    r["threads"] = torch.get_num_threads()
    out.write_text(json.dumps(r))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=96)
    ap.add_argument("--model", default="default")
    ap.add_argument("--data", default=None, help="a data folder (default: build one without distillation)")
    # the CLI's own trainer against the baseline with only its precision matched (TRL's bf16 default
    # runs at ~1 GFLOP/s on an AVX2 CPU: `plain` measures that default, not a trainer)
    ap.add_argument("--arms", default=f"plain-fp32,{CLI_ARM}")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each arm (default: torch's)")
    ap.add_argument("--recipe", default="paper", help="our arms' recipe, its gate off (default: paper)")
    ap.add_argument("--set", action="append", default=[], help="group.field=value for our arms (repeatable)")
    ap.add_argument("--out-name", default="train_throughput", help="results file name (bench/results/NAME.json)")
    ap.add_argument("--keep", default=None, help="copy each of our arms' trained patch to KEEP/ARM")
    ap.add_argument("--arm", default=None, help=argparse.SUPPRESS)  # internal: run one arm here
    ap.add_argument("--arm-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    from safety_patch.train.api import parse_set

    RECIPE["name"], RECIPE["set"] = args.recipe, parse_set(args.set)
    KEEP["dir"] = args.keep
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.arm:
        run_arm(args.arm, args.model, Path(args.data), args.rows, Path(args.arm_out))
        return
    from safety_patch.data.build import DataConfig, build
    from safety_patch.models import load_model

    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    results: dict[str, dict] = {}
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data_dir = Path(args.data) if args.data else work / "data"
        if not args.data:
            build(data_dir, DataConfig(distill=False))
        lm = load_model(args.model)
        n_matmul = sum(m.weight.numel() for m in lm.model.modules() if isinstance(m, torch.nn.Linear))
        del lm
        peak = matmul_peak()
        for arm in arms:
            out = work / f"{arm}.json"
            cmd = [sys.executable, __file__, "--arm", arm, "--arm-out", str(out), "--rows", str(args.rows),
                   "--model", args.model, "--data", str(data_dir), "--recipe", args.recipe]
            cmd += [f"--set={x}" for x in args.set] + (["--keep", args.keep] if args.keep else [])
            cmd += (["--threads", str(args.threads)] if args.threads else [])
            env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # glibc unless the arm says
            if "mimalloc" in arm:
                from safety_patch.allocator import mimalloc_library

                env["LD_PRELOAD"] = str(mimalloc_library())
            t = time.time()
            subprocess.run(cmd, check=True, env=env)
            results[arm] = json.loads(out.read_text()) | {"process_seconds": round(time.time() - t, 1)}
    names = {"plain": "plain TRL + PEFT (defaults)", "plain-fp32": "plain TRL + PEFT (defaults, but fp32)",
             "ours": "safety-patch train, one pass per batch, glibc (the trainer before session 17; not the CLI's)",
             "ours-full-logits": "safety-patch train, full-logits loss (before)",
             "ours-bf16": "safety-patch train + bf16 autocast (not adopted)",
             "ours-mmap": "safety-patch train, mmap threshold pinned",
             "ours-recompute": "safety-patch train, recomputation",
             "ours-recompute-mmap": "safety-patch train, recomputation + mmap threshold pinned",
             "ours-mimalloc": "safety-patch train, mimalloc",
             "ours-recompute-mimalloc": "safety-patch train, recomputation + mimalloc (the default of sessions 17-27)",
             "ours-mb1-mimalloc": "safety-patch train, passes of 1 row + mimalloc (the CLI's default)"}
    out_rows = []
    for arm, r in results.items():
        tps = r["tokens"] / r["seconds"]
        out_rows.append({"arm": names.get(arm, arm), "steps": r["steps"], "tokens": r["tokens"], "seconds": round(r["seconds"], 1),
                         "tokens_per_s": round(tps, 1), "mfu": round(6 * n_matmul * tps / (peak * 1e9), 4),
                         "peak_rss_mb": r["peak_rss_mb"], "threads": r["threads"],
                         "adapter_sha256": r.get("adapter_sha256")})
    print_table(out_rows)
    tps = {arm: r["tokens"] / r["seconds"] for arm, r in results.items()}
    ratios = {f"{a}/{b}": round(tps[a] / tps[b], 3) for b in ("plain", "plain-fp32") if b in tps
              for a in tps if not a.startswith("plain")}
    if "ours" in tps and "ours-full-logits" in tps:
        ratios["ours/ours-full-logits"] = round(tps["ours"] / tps["ours-full-logits"], 3)
    print(f"\nratios: {ratios}   fp32 matmul peak: {peak:.1f} GFLOP/s   matmul params: {n_matmul:,}   "
          f"load average at start: {load[0]:.2f}, at end: {os.getloadavg()[0]:.2f}")
    write(args.out_name, {"rows": out_rows, "arms": results, "ratios": ratios,
                               # the headline: what `safety-patch train` runs, against the baseline in this run
                               "ratio": next((ratios[k] for k in (f"{CLI_ARM}/plain-fp32", f"{CLI_ARM}/plain",
                                                                  "ours/plain-fp32", "ours/plain") if k in ratios), None),
                               "ratio_arms": next((k for k in (f"{CLI_ARM}/plain-fp32", f"{CLI_ARM}/plain",
                                                               "ours/plain-fp32", "ours/plain") if k in ratios), None),
                               "matmul_peak_gflops": peak,
                               "matmul_parameters": n_matmul, "n_rows": args.rows, "recipe": args.recipe,
                               "set": args.set,
                               "load_average_start": load, "load_average_end": os.getloadavg()}, run=(ap, args))


if __name__ == "__main__":
    main()
