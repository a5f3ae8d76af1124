"""``safety-patch train``: one TRL trainer for every arm, writing a patch atomically.

The LoRA and full-parameter arms differ only in what trains: LoRA passes a PEFT config to
TRL's trainer; full trains every weight and saves W_ft - W0. Checkpoints and the metrics
log live in ``.<out>.partial/`` beside the output, so ``--resume`` continues after a kill and
a killed run never leaves anything that looks like a finished patch.

Resume is exact or refused: each checkpoint is complete only once ``CHECKPOINT_STATE`` is
written into it (last, atomically; a checkpoint cut short by a kill is never resumed from);
the run's settings, base model and data are recorded in ``RUN_FILE`` and a resume with any
difference is refused; the KL anchor's stream position, the metrics log's length and the
cost figures so far travel with each checkpoint. A non-finite gradient, weight or logged
loss stops training with an error, before any patch is written.

The work folder, checkpoints and resume checks are :mod:`.checkpoints`; the trainer callbacks
(the finite guard, the plan check, early stop, the last step, the metrics log) :mod:`.callbacks`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from ..atomic import atomic_dir, write_json
from ..errors import SafetyPatchError
from ..outputs import claims_output
from ..patches import DELTA_FILE, finalize_patch
from ..provenance import library_versions
from .callbacks import (
    _check_lr_plan,
    _early_stop,
    _finite_guard,
    _last_step,
    _Metrics,
    _nonfinite,
    _PlanError,
)
from .checkpoints import (
    RUN_FILE,
    _check_resume,
    _checkpoint_state,
    _checkpoints,
    _delta,
    _last_checkpoint,
    _read_checkpoint_state,
    _rewind,
    _rows_sha256,
    _snapshotter,
    _work_dir,
)
from .config import TrainConfig, parse_layers
from .data import dpo_rows, drop_too_long, training_rows


def _check_answers_are_the_bases(data, lm, cfg: TrainConfig, counts: dict, anchored: bool) -> None:
    """Refuse to train on another model's answers as if they were the base's own. Found by a user's
    trial: a data folder distilled by one base trained an always-on patch of another without a word,
    its 380 anchor rows described as "the base model's own answers". The rows that carry distilled
    answers are the general/contrast mixes, the KL anchor's pool and DPO's rejected answers; the
    refusal rows and the gate's prompts are not answers of the base. ``data.other_models_answers``
    allows it (recorded in patch.json's config). Raises SafetyPatchError naming both bases."""
    uses = [k for k in counts if k != "safety" and counts[k]] + (["anchor"] if anchored else []) + (
        ["dpo rejected"] if cfg.loss.objective == "dpo" else [])
    info = data.manifest.get("distillation") or {}
    by = info.get("fingerprint")
    if not uses or not isinstance(by, str) or by == lm.fingerprint or cfg.data.other_models_answers:
        return
    same_name = info.get("model") == lm.name
    raise SafetyPatchError(
        f"{data.path}: its answers were distilled by {info.get('model') or 'another model'} (fingerprint {by[:12]}…), "
        f"but this run trains {lm.name} ({lm.fingerprint[:12]}…"
        + (f", the same name loaded as {str(lm.runtime.dtype).removeprefix('torch.')}: other weights, other answers"
           if same_name else "")
        + f"), and its {', '.join(uses)} rows are read as the base's own answers; build the data with this model "
        f"(`safety-patch data build --model {lm.name}`{' with the same --dtype' if same_name else ''}), or pass "
        "`--set data.other_models_answers=true` to train on another model's answers")


def _check_targets(model, cfg: TrainConfig) -> None:
    from ..models import linear_module_kinds

    kinds = linear_module_kinds(model)
    if cfg.lora.target_modules != "all-linear":
        wanted = [t.strip() for t in cfg.lora.target_modules.split(",") if t.strip()]
        missing = [t for t in wanted if t not in kinds]
        if missing:
            raise SafetyPatchError(f"--target-modules {', '.join(missing)} not in the model; it has: {', '.join(kinds)}")
    if cfg.lora.layers is not None:
        n = model.config.num_hidden_layers
        bad = [i for i in parse_layers(cfg.lora.layers) if not 0 <= i < n]
        if bad:
            raise SafetyPatchError(f"--layers {cfg.lora.layers}: the model has layers 0-{n - 1}")
    if cfg.method == "lora":
        # A rank past min(in, out) adds no direction (BA's rank is at most that) but allocates
        # r x (in + out) per module: --rank 100000 was an out-of-memory kill, not an error.
        from ..models import linear_module_names

        wanted = set(kinds) if cfg.lora.target_modules == "all-linear" else {
            t.strip() for t in cfg.lora.target_modules.split(",") if t.strip()}
        mods = dict(model.named_modules())
        name, m = min(((n, mods[n]) for n in linear_module_names(model) if n.rsplit(".", 1)[-1] in wanted),
                      key=lambda t: min(t[1].in_features, t[1].out_features))
        cap = min(m.in_features, m.out_features)
        if cfg.lora.rank > cap:
            raise SafetyPatchError(f"--rank {cfg.lora.rank} is larger than the smallest adapted matrix allows: {name} "
                                   f"is {m.out_features} x {m.in_features}, so no update of it has rank above {cap}; "
                                   f"use --rank {cap} or less")


# [outputs helper] hold a claim (flock on .<out>.lock) on --out for the whole run: a second
# `train` into the same --out fails at once instead of deleting this run's work folder.
@claims_output("out")
def train(data_dir: str | Path, out: str | Path, cfg: TrainConfig, model: str = "default", device: str = "auto",
          dtype: str = "auto", resume: bool = False, overwrite: bool = False, progress: bool = True,
          stack: list[str | Path] | None = None) -> dict:
    """Train one patch; returns its patch.json. Every check runs before training starts.

    ``stack``: patches already applied (lifelong rounds). They are folded into the weights
    before training, so the new patch learns only what the stack still lacks; its
    ``patch.json`` lists them, and attaching it requires them first.
    """
    from ..data.build import manifest_sha256
    from ..data.folder import DataFolder
    from ..models import load_model
    from ..runtime import peak_memory_mb, reset_peak_memory, seed_everything

    cfg.validate()
    out = Path(out)
    data_dir = Path(data_dir)
    data = DataFolder(data_dir)  # the manifest checked now; each file's rows on first read, once
    if out.exists() and not overwrite:
        raise SafetyPatchError(f"{out} exists; pass --overwrite to replace it")
    work = _work_dir(out)
    ckpt = _last_checkpoint(work) if resume else None
    if resume and ckpt is None and not work.exists():
        raise SafetyPatchError(f"nothing to resume: no interrupted run of {out} (its work folder {work} does not exist); "
                               "run without --resume")
    if resume and ckpt is None:
        cut = [p.name for p in _checkpoints(work)]
        raise SafetyPatchError(f"nothing to resume: no complete checkpoint under {work}" + (
            f" ({', '.join(cut)} cut short by a kill); run without --resume to start over" if cut else ""))
    main_process = int(os.environ.get("RANK", "0")) == 0  # under accelerate/torchrun only rank 0 touches files
    if not resume and work.exists() and main_process:
        if (last := _last_checkpoint(work)) is not None:  # say what is dropped: --resume would have kept it
            print(f"[train] {out}: an interrupted run left a checkpoint ({Path(last).name}); starting afresh without it "
                  "(pass --resume to continue that run instead)", file=sys.stderr, flush=True)
        shutil.rmtree(work)
    rows, counts = dpo_rows(data, cfg) if cfg.loss.objective == "dpo" else training_rows(data, cfg)
    from ..patches import merged_state_dict, read_patch

    stack_patches = [read_patch(p) for p in stack or []]
    anchor_pool = None
    if cfg.anchor.kl > 0:
        from .data import anchor_rows

        anchor_pool = anchor_rows(data, cfg)  # read before the model loads: a data error fails fast
    gate_data = None
    if cfg.gated:
        from ..gate.pool import gate_prompts

        gate_data = gate_prompts(data, cfg.gate_for_run())  # the gate's files checked before the model loads too (rows kept: read once)
    # What the run is: a resume must match it in full, or patch.json would record settings,
    # data or a base model that trained only part of the patch.
    identity = {"config": cfg.record(), "data_manifest_sha256": manifest_sha256(data_dir),
                "data_rows_sha256": _rows_sha256(rows, anchor_pool, gate_data), "stack": [p.id for p in stack_patches],
                "world_size": int(os.environ.get("WORLD_SIZE", "1"))}
    if resume:
        _check_resume(work, identity)
    lm = load_model(model, device=device, dtype=dtype)
    _check_answers_are_the_bases(data, lm, cfg, counts, anchor_pool is not None)
    if not getattr(lm.tokenizer, "chat_template", None):
        # TRL formats every conversation with the template (a user's trial: its ValueError as a traceback);
        # `chat` and `data build` fall back to a plain transcript, which no trainer would reproduce
        raise SafetyPatchError(f"--model {model}: its tokenizer has no chat template, and training formats each "
                               "conversation with it; use a chat model, or add the model's own `chat_template` to "
                               "its tokenizer_config.json")
    identity_model = {"base_fingerprint": lm.fingerprint, "dtype": str(lm.runtime.dtype).removeprefix("torch.")}
    if resume:
        _check_resume(work, identity_model)
    if stack_patches:
        lm.model.load_state_dict(merged_state_dict(lm.model, stack_patches, lm.fingerprint), strict=False)
    _check_targets(lm.model, cfg)
    gate, gate_info = None, None
    if cfg.gated:
        gate, gate_info = _fit_gate(lm, data, cfg, cache=not stack_patches)
        if main_process:  # what was fit, before the minutes of training steps
            tf = gate_info.get("threshold_from") or {}
            raised = f", raised by {tf['raised_by']:+.3f} for family_fpr {tf['family_fpr']}" if "raised_by" in tf else ""
            print(f"[train] gate: layer{'s' * (len(gate.layers) > 1)} {', '.join(map(str, gate.layers))}, threshold "
                  f"{gate.threshold:+.3f}{raised}; fit in {gate_info['fit_seconds']} s", file=sys.stderr, flush=True)
    rows, counts["dropped_too_long"] = drop_too_long(rows, lm.tokenizer, cfg.data.max_seq_len)
    if not rows:
        raise SafetyPatchError(f"every training row is longer than --max-seq-len {cfg.data.max_seq_len} tokens")
    seed_everything(cfg.optim.seed)
    work.mkdir(parents=True, exist_ok=True)
    prior = _read_checkpoint_state(ckpt) if ckpt else {}
    if main_process:
        if ckpt:
            cut = _rewind(work, ckpt, prior)
            # said before the minutes of replay: a resumed run looked like a fresh one until patch.json
            print(f"[train] resuming {out} from {Path(ckpt).name} (step {prior['step']})"
                  + (f"; {', '.join(cut)} cut short by a kill, dropped" if cut else ""), file=sys.stderr, flush=True)
        else:
            write_json(work / RUN_FILE, identity | identity_model)

    base = None
    peft_config = None
    if cfg.method == "lora":
        from peft import LoraConfig

        if cfg.lora.target_modules != "all-linear":
            targets = [t.strip() for t in cfg.lora.target_modules.split(",") if t.strip()]
        elif cfg.lora.layers:
            # PEFT refuses layers_to_transform with the string "all-linear"; the same modules
            # named one by one (the output head is already excluded) are what it would target.
            from ..models import linear_module_kinds

            targets = linear_module_kinds(lm.model)
        else:
            targets = "all-linear"
        peft_config = LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout, target_modules=targets,
                                 layers_to_transform=parse_layers(cfg.lora.layers) if cfg.lora.layers else None,
                                 task_type="CAUSAL_LM", bias="none")
    else:
        # W0 on the CPU, in the model's dtype: the delta is computed against exactly these values.
        base = {n: p.detach().to("cpu", copy=True) for n, p in lm.model.named_parameters()}

    anchor = None
    if cfg.anchor.kl > 0:
        from .anchor import AnchorStream, tokenize_anchor

        examples = tokenize_anchor(anchor_pool, lm.tokenizer, cfg.data.max_seq_len, cfg.anchor.max_tokens)
        if not examples:
            raise SafetyPatchError(f"every anchor row is longer than --max-seq-len {cfg.data.max_seq_len} tokens")
        pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
        anchor = AnchorStream(examples, cfg.anchor.batch_size or cfg.optim.batch_size, pad, cfg.optim.seed, rank=int(os.environ.get("RANK", "0")),
                              world_size=int(os.environ.get("WORLD_SIZE", "1")))
        if prior.get("anchor") is not None:  # where the interrupted run's stream stood at the checkpoint
            anchor.load_state(prior["anchor"])
        counts["anchor"] = len(examples)
    from ..models import peft_quiet

    with peft_quiet():  # TRL wraps the model in PEFT here
        trainer = _make_trainer(lm, rows, cfg, peft_config, work, progress, anchor)
    # The guard first: a non-finite value stops the run before another callback logs or saves it.
    trainer.add_callback(_finite_guard(cfg.resolved_lr()))
    # Without its tqdm bar the trainer prints every log dict to stdout; metrics.jsonl keeps them.
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    if progress and not sys.stderr.isatty():
        from ..progress import trainer_callback

        trainer.add_callback(trainer_callback())
    metrics = _Metrics(work / "metrics.jsonl")
    metrics.t0 -= prior.get("wall_seconds", 0.0)  # seconds count from the run's start, over every leg
    trainer.add_callback(metrics)
    legs = prior.get("legs", 0) + 1
    clock = {"t0": time.time(), "prior_wall": prior.get("wall_seconds", 0.0), "prior_peak": prior.get("peak_memory_mb", 0.0),
             "legs": legs, "device": lm.runtime.device}
    trainer.add_callback(_checkpoint_state(work / "metrics.jsonl", anchor, clock))
    projection = None
    if cfg.lora.orthogonal_k > 0:
        from .oplora import dominant_bases, projection_callback

        # Bases of the weights being trained (a stack folded in counts as W0); a bad k fails
        # here, before any training.
        projection = projection_callback(dominant_bases(trainer.model, cfg.lora.orthogonal_k))
        trainer.add_callback(projection)
    from .config import parse_steps

    # before any step: a stop or snapshot where every step so far ran at lr 0 is the base
    trainer.add_callback(_check_lr_plan(cfg.optim.stop_after, parse_steps(cfg.optim.snapshot_steps)
                                        if cfg.optim.snapshot_steps else []))
    if cfg.optim.snapshot_steps:
        trainer.add_callback(_snapshotter(work, parse_steps(cfg.optim.snapshot_steps), base))
    if cfg.optim.stop_after is not None and cfg.optim.stop_after < 1:
        trainer.add_callback(_early_stop(cfg.optim.stop_after))
    trainer.add_callback(_last_step())  # last: after _early_stop has decided to stop
    reset_peak_memory(lm.runtime.device)
    t0 = clock["t0"] = time.time()
    try:
        result = trainer.train(resume_from_checkpoint=ckpt)
    except _PlanError:
        if ckpt is None and main_process:  # refused before any step: no work folder to resume from
            shutil.rmtree(work, ignore_errors=True)
        raise
    # Cost figures cover every leg of a resumed run (the work a kill threw away is not counted).
    wall = clock["prior_wall"] + time.time() - t0
    peak = max(clock["prior_peak"], peak_memory_mb(lm.runtime.device))
    # Under DDP every rank leaves together, after rank 0 has written the patch (see _ranks_leave_together).
    with _ranks_leave_together(trainer):
        if not trainer.is_world_process_zero():
            return {}
        state = trainer.state
        tokens = int(state.num_input_tokens_seen or 0)
        trained = trainer.model
        trainable = sum(p.numel() for p in trained.parameters() if p.requires_grad)
        losses = [r["loss"] for r in state.log_history if "loss" in r]
        bad = _nonfinite((n, p) for n, p in trained.named_parameters() if p.requires_grad)
        if bad:  # fail closed: also a checkpoint resumed at its last step never passed the per-step guard
            raise SafetyPatchError(f"trained weight {bad} is not finite; no patch written")
        extra = {}
        if projection is not None:
            from .oplora import overlap

            extra["orthogonal_overlap"] = round(overlap(trained, projection.bases), 8)

        with atomic_dir(out, overwrite=overwrite) as tmp:
            if cfg.method == "lora":
                trained.save_pretrained(str(tmp), safe_serialization=True)
                fmt = "lora"
            else:
                from safetensors.torch import save_file

                save_file(_delta(trained, base), str(tmp / DELTA_FILE), metadata={"format": "pt"})
                fmt = "delta"
            if gate is not None:  # a LoRA adapter or a full-parameter delta, routed per prompt alike
                gate.save(tmp)
            common = dict(
                stack=[p.id for p in stack_patches],
                method=cfg.method,
                objective=cfg.loss.objective,
                config=cfg.record(),
                data={"dir": str(Path(data_dir).resolve()), "manifest_sha256": manifest_sha256(data_dir), "rows": counts},
                **({"gate": gate_info} if gate_info else {}),
            )
            base_info = {"name": model, "source": lm.source, "checkpoint": lm.path, "fingerprint": lm.fingerprint}
            # Snapshots are complete patches of their own (attach/eval/merge them like any other);
            # a step past the end of training is reported, not silently missing.
            if cfg.optim.snapshot_steps:
                from .config import parse_steps

                snaps, missing = {}, []
                for step in parse_steps(cfg.optim.snapshot_steps):
                    src = work / "snapshots" / f"step-{step}"
                    if not src.is_dir():
                        missing.append(step)
                        continue
                    shutil.copytree(src, tmp / "snapshots" / src.name)
                    if gate is not None:
                        gate.save(tmp / "snapshots" / src.name)
                    finalize_patch(tmp / "snapshots" / src.name, fmt, base_info, **common,
                                   training={"steps": step, "snapshot_of": str(out),
                                             "epochs_done": round(step / max(state.max_steps, 1) * cfg.optim.epochs, 4)})
                    snaps[str(step)] = f"snapshots/{src.name}"
                extra["snapshots"] = snaps
                if missing:
                    extra["snapshots_not_reached"] = missing
            meta = finalize_patch(
                tmp, fmt, base_info, **common,
                training={
                    "steps": state.global_step,
                    "planned_steps": state.max_steps,
                    "epochs": cfg.optim.epochs,
                    "loss_first": losses[0] if losses else None,
                    "loss_last": losses[-1] if losses else None,
                    "train_loss": _run_loss(state.log_history, state.global_step,
                                            None if ckpt else getattr(result, "training_loss", None)),
                    "wall_seconds": round(wall, 2),
                    "tokens_seen": tokens,
                    "tokens_per_s": round(tokens / wall, 2) if wall > 0 else None,
                    "peak_memory_mb": round(peak, 1),
                    "trainable_parameters": trainable,
                    "total_parameters": sum(p.numel() for p in lm.model.parameters()),
                    "resumed_from": ckpt,
                    "legs": legs,
                    "device": str(lm.runtime.device),
                    "dtype": str(lm.runtime.dtype).removeprefix("torch."),
                    "threads": torch.get_num_threads(),
                    "world_size": trainer.args.world_size,
                    "micro_batch_size": trainer.args.per_device_train_batch_size,
                    "activation_checkpointing": bool(trainer.args.activation_checkpointing),
                    **extra,
                },
                versions=library_versions(),
            )
            shutil.copy(work / "metrics.jsonl", tmp / "metrics.jsonl") if (work / "metrics.jsonl").exists() else None
        shutil.rmtree(work, ignore_errors=True)
        return meta


def _run_loss(log_history: list[dict], global_step: int, fallback: float | None) -> float | None:
    """The mean training loss over every optimiser step of the run, every leg of a resumed one
    included: each logged loss is the mean over the steps since the previous log, so the logs
    weighted by their steps give it (the trainer's own ``training_loss`` covers only the steps of
    its last ``train()`` call). ``fallback`` when the logs do not reach ``global_step``."""
    prev, total = 0, 0.0
    for r in log_history:
        if "loss" in r and "step" in r and r["step"] > prev:
            total += r["loss"] * (r["step"] - prev)
            prev = r["step"]
    return total / prev if prev == global_step > 0 else fallback


def _fit_gate(lm, data_dir, cfg: TrainConfig, cache: bool = True):
    """Fit the patch's gate on the base model (before any adapter exists) with the gate stage
    (gate/fit.py, the same fit as ``safety-patch gate fit``); every rank fits the same one
    (deterministic), rank 0 writes it. Returns (gate, patch.json's ``gate`` info). ``cache``:
    reuse features by the base's fingerprint (False when a stack is folded into the weights:
    the model is then not the fingerprinted base)."""
    from ..gate.fit import fit_gate_on_data

    # validate=None: the validation report when the folder has a val split (derived folders may not)
    return fit_gate_on_data(lm.model, lm.tokenizer, data_dir, cfg.gate_for_run(), validate=None,
                            fingerprint=lm.fingerprint if cache else None)


@contextlib.contextmanager
def _ranks_leave_together(trainer):
    """Under DDP, every rank waits at the end of this block and tears the process group down
    before it returns: a rank that exits while another still holds the group can abort in
    gloo's teardown (seen when training stops early, mid-epoch)."""
    try:
        yield
    finally:
        if trainer.accelerator.num_processes > 1:
            import torch.distributed as dist

            trainer.accelerator.wait_for_everyone()
            if dist.is_available() and dist.is_initialized():
                dist.destroy_process_group()


def pass_size(cfg: TrainConfig, device: torch.device) -> int:
    """Rows per forward/backward pass: ``optim.micro_batch_size`` resolved (config.py).

    The largest divisor of ``optim.batch_size`` not above the setting, so that every batch splits
    into equal passes; unset, 1 on a CPU (no padding; docs/benchmarks.md) and the whole batch on
    an accelerator. A DPO run always passes its whole batch (its loss is a mean per pair)."""
    b = cfg.optim.batch_size
    m = cfg.optim.micro_batch_size
    if cfg.loss.objective == "dpo":
        return b
    if m is None:
        m = 1 if device.type == "cpu" else b
    return max(d for d in range(1, min(m, b) + 1) if b % d == 0)


def recomputes(cfg: TrainConfig, device: torch.device) -> bool:
    """``optim.gradient_checkpointing`` resolved: unset, off on a CPU and on elsewhere (config.py)."""
    g = cfg.optim.gradient_checkpointing
    return device.type != "cpu" if g is None else g


def _make_trainer(lm, rows, cfg: TrainConfig, peft_config, work: Path, progress: bool, anchor=None):
    from datasets import Dataset

    micro = pass_size(cfg, lm.runtime.device)
    passes = cfg.optim.batch_size // micro
    common = dict(
        output_dir=str(work / "checkpoints"),
        # A batch of optim.batch_size rows in `passes` passes of `micro` rows: the trainer's
        # accumulation sums their gradients and normalises the loss over the batch's supervised
        # tokens (num_items_in_batch), and its length-grouped sampler groups
        # micro x accumulation = the same batch_size x grad_accum rows as one pass would.
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=cfg.optim.grad_accum * passes,
        learning_rate=cfg.resolved_lr(),
        num_train_epochs=cfg.optim.epochs,
        lr_scheduler_type=cfg.optim.scheduler,
        warmup_steps=cfg.optim.warmup_ratio,
        weight_decay=cfg.optim.weight_decay,
        logging_steps=cfg.optim.logging_steps,
        logging_first_step=True,  # and the last (_last_step): the first and last losses patch.json records
        # Log a NaN/inf loss as it is (the trainer's default logs the running mean instead), so
        # that _finite_guard sees it.
        logging_nan_inf_filter=False,
        save_strategy="steps",
        save_steps=cfg.optim.save_steps,
        save_total_limit=2,
        seed=cfg.optim.seed,
        data_seed=cfg.optim.seed,
        report_to="none",
        # Unset: off on a CPU (passes of one row keep activations small), on on an accelerator
        # (a pass of 8 x 512 tokens keeps 6.1 GB of fp32 activations on the embedded model);
        # recomputed, the adapter is the same, bit for bit.
        activation_checkpointing=recomputes(cfg, lm.runtime.device),
        # DPO rows have no input_ids column to group by until the trainer tokenizes them.
        train_sampling_strategy="random" if cfg.loss.objective == "dpo" and cfg.optim.sampling == "group_by_length" else cfg.optim.sampling,
        include_num_input_tokens_seen="non_padding",
        bf16=lm.runtime.dtype is torch.bfloat16,
        fp16=lm.runtime.dtype is torch.float16,
        use_cpu=lm.runtime.device.type == "cpu",
        # The trainer's own bar on a terminal; in a log file progress.trainer_callback writes lines instead.
        disable_tqdm=not progress or not sys.stderr.isatty(),
        dataloader_num_workers=0,
        max_length=cfg.data.max_seq_len,
    )
    if any(r.get("prefill") for r in rows):
        if cfg.loss.objective == "dpo":
            raise SafetyPatchError("rows with meta.prefill (a red-team round's prefill jailbreaks) train with a "
                                   "completion loss that skips the prefill; DPO has no such loss: use an SFT recipe")
        rows = [{"prefill": None} | r for r in rows]  # from_list takes its columns from the first row
    ds = Dataset.from_list(rows)
    if cfg.loss.objective == "dpo":
        from trl import DPOTrainer

        from .trl_configs import PatchDPOConfig

        args = PatchDPOConfig(beta=cfg.loss.dpo_beta, **common)
        return DPOTrainer(model=lm.model, args=args, train_dataset=ds, processing_class=lm.tokenizer, peft_config=peft_config)
    from trl import SFTTrainer

    from .trl_configs import PatchSFTConfig

    args = PatchSFTConfig(completion_only_loss=True, **common)
    # Every SFT run, the plain refusal recipe included, goes through our subclass: it applies the
    # vocabulary projection only where a loss is taken (train/loss.py), with TRL's loss semantics.
    from .anchor import make_anchored_trainer

    ref = None
    if peft_config is None and anchor is not None:  # full-parameter: the reference is a frozen copy of W0
        import copy

        ref = copy.deepcopy(lm.model).eval().requires_grad_(False)
    return make_anchored_trainer(SFTTrainer)(model=lm.model, args=args, train_dataset=ds, processing_class=lm.tokenizer,
                                             peft_config=peft_config, anchor=anchor, anchor_kl=cfg.anchor.kl, ref_model=ref,
                                             decision_tokens=cfg.loss.decision_tokens, decision_weight=cfg.loss.decision_weight,
                                             passes=passes)
