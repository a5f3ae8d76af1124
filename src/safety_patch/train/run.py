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
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
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
from .config import TrainConfig, parse_layers
from .data import dpo_rows, drop_too_long, training_rows


def _work_dir(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


CHECKPOINT_STATE = "safety_patch_state.json"
"""Written last, atomically, into every checkpoint folder (see ``_checkpoint_state``): the
trainer writes a checkpoint in place (model, optimizer, scheduler, RNG, trainer_state.json), so
a folder without this file was cut short by a kill and is never resumed from."""
RUN_FILE = "run.json"
"""The run's identity in its work folder: resolved config, data hashes, base fingerprint,
stack, dtype and world size. ``--resume`` refuses any difference."""


def _checkpoints(work: Path) -> list[Path]:
    """The checkpoint-N folders under ``work``, oldest (lowest N) first."""
    ck = work / "checkpoints"
    if not ck.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ck.iterdir() if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def _last_checkpoint(work: Path) -> str | None:
    """The newest *complete* checkpoint under ``work`` (one holding ``CHECKPOINT_STATE``), or None."""
    done = [p for p in _checkpoints(work) if (p / CHECKPOINT_STATE).is_file()]
    return str(done[-1]) if done else None


def _read_checkpoint_state(ckpt: str) -> dict:
    path = Path(ckpt) / CHECKPOINT_STATE
    try:
        st = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SafetyPatchError(f"{path}: unreadable checkpoint state ({e}); run without --resume to start over") from None
    if not isinstance(st, dict) or not isinstance(st.get("step"), int):
        raise SafetyPatchError(f"{path}: not a checkpoint state; run without --resume to start over")
    return st


def _rows_sha256(*parts) -> str:
    """sha256 of the rows training reads (after the config's selection): an edited data file
    changes it even where the manifest does not."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def _short(value) -> str:
    """A value for a one-line diff: long strings (hashes, fingerprints) cut to their first 12 characters."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 24 else text[:12] + "..."


def _flat(d: dict, prefix: str = "") -> dict:
    """``{"lora": {"rank": 8}}`` -> ``{"lora.rank": 8}``."""
    out: dict = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[prefix + k] = v
    return out


# Settings a resumed run may change: when checkpoints and logs are written, and recomputation
# (the same adapter bit for bit, OptimSettings.gradient_checkpointing); none changes the patch.
RESUME_FREE = frozenset({"optim.save_steps", "optim.logging_steps", "optim.gradient_checkpointing"})


def _check_resume(work: Path, identity: dict) -> None:
    """Refuse to resume ``work`` when ``identity`` (the keys given) differs from the interrupted
    run's ``RUN_FILE``, except for the settings in ``RESUME_FREE``; the one-line error lists every
    difference as ``field old -> new``."""
    path = work / RUN_FILE
    try:
        prior = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SafetyPatchError(f"cannot resume {work}: {RUN_FILE} is missing, so the interrupted run's settings are "
                               f"unknown; run without --resume to start over") from None
    except (OSError, ValueError) as e:
        raise SafetyPatchError(f"cannot resume {work}: {path} is unreadable ({e}); run without --resume to start over") from None
    diffs = []
    for key, new in identity.items():
        old = prior.get(key) if isinstance(prior, dict) else None
        if key == "config" and isinstance(old, dict):
            old, new = _flat(old), _flat(new)  # groups: name the field, "lora.rank 8 -> 4"
            diffs += [f"{k} {_short(old.get(k))} -> {_short(new.get(k))}" for k in sorted(set(old) | set(new))
                      if old.get(k) != new.get(k) and k not in RESUME_FREE]
        elif old != new:
            diffs.append(f"{key} {_short(old)} -> {_short(new)}")
    if diffs:
        raise SafetyPatchError(f"cannot resume {work}: the interrupted run used other settings ({'; '.join(diffs)}); "
                               f"resume with the same ones, or run without --resume to start over")


def _nonfinite(named) -> str | None:
    """The name of the first tensor in ``named`` ((name, tensor or None) pairs) holding a NaN or
    an infinity, or None; one device sync for all of them."""
    tensors = [(n, t.detach()) for n, t in named if t is not None]
    if not tensors:
        return None
    # Fast path: one fused norm over every tensor (one read of each; a NaN or an infinity anywhere
    # makes it non-finite). isfinite().all() per tensor made ~4 passes and a bool copy of each:
    # 6% of a full-parameter step of the embedded model (profile, docs/lab-notebook.md session 19).
    # A finite norm proves every element finite; a non-finite one (or an overflow of the sum of
    # squares) falls through to the exact scan, which decides.
    if torch.isfinite(torch.nn.utils.get_total_norm([t for _, t in tensors], foreach=True)):
        return None
    dev = tensors[0][1].device
    ok = torch.stack([torch.isfinite(t).all().to(dev) for _, t in tensors])
    if bool(ok.all()):
        return None
    return tensors[int((~ok).nonzero()[0, 0])][0]


def _finite_guard(lr: float):
    """A callback that stops training with ``SafetyPatchError`` at the first non-finite gradient
    (before the optimiser applies it), weight (after a step) or logged value (loss, grad norm):
    an all-NaN adapter turns every answer empty, which a safety evaluation scores as perfect.
    Gradients are all-reduced, so under DDP every rank stops at the same step."""
    from transformers import TrainerCallback

    def stop(step: int, what: str) -> None:
        raise SafetyPatchError(f"training stopped at step {step}: {what} is not finite (learning rate {lr:g}; a "
                               f"lower one may train); no patch written")

    class FiniteGuard(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            if args.fp16:  # fp16's loss scaler skips a step with overflowed gradients by design
                return
            bad = _nonfinite((n, p.grad) for n, p in model.named_parameters() if p.requires_grad)
            if bad:
                stop(state.global_step + 1, f"the gradient of {bad}")

        def on_step_end(self, args, state, control, model=None, **kw):
            bad = _nonfinite((n, p) for n, p in model.named_parameters() if p.requires_grad)
            if bad:
                stop(state.global_step, f"weight {bad}")

        def on_log(self, args, state, control, logs=None, **kw):
            for k, v in (logs or {}).items():
                if isinstance(v, float) and not math.isfinite(v) and not (args.fp16 and k == "grad_norm"):
                    stop(state.global_step, f"the logged {k} ({v})")

    return FiniteGuard()


def _checkpoint_state(metrics: Path, anchor, clock: dict):
    """A callback that completes each checkpoint: after the trainer has written it, rank 0 writes
    ``CHECKPOINT_STATE`` into it (atomically, last) with what a resume needs beyond the
    trainer's own state: the KL anchor stream's position, the metrics log's length at this
    step, and the cost figures so far (wall seconds and peak memory over every leg)."""
    from transformers import TrainerCallback

    from ..runtime import peak_memory_mb

    class CheckpointState(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            # A checkpoint step is a logged step too: the trainer keeps the loss of the steps since
            # its last log in memory only, so a run resumed from a checkpoint between two logs lost
            # those steps' losses (its train_loss and logged window means differed from the
            # uninterrupted run's, its adapter did not). Logged here, they are in the checkpoint.
            if control.should_save:
                control.should_log = True

        def on_save(self, args, state, control, **kw):
            if not state.is_world_process_zero:
                return
            ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_json(ckpt / CHECKPOINT_STATE, {
                "step": state.global_step,
                "metrics_bytes": metrics.stat().st_size if metrics.exists() else 0,
                "wall_seconds": clock["prior_wall"] + time.time() - clock["t0"],
                "peak_memory_mb": max(clock["prior_peak"], peak_memory_mb(clock["device"])),
                "legs": clock["legs"],
                "anchor": anchor.state() if anchor is not None else None,
            })

    return CheckpointState()


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


class _Metrics:
    """A Trainer callback: appends every log to metrics.jsonl and tracks peak memory and tokens."""

    def __new__(cls, path: Path):
        from transformers import TrainerCallback

        class Callback(TrainerCallback):
            def __init__(self):
                self.path = path
                self.t0 = time.time()  # a resumed run moves it back by the earlier legs' seconds
                self.tokens = 0

            def on_log(self, args, state, control, logs=None, **kw):
                if not state.is_world_process_zero or not logs:
                    return
                self.tokens = int(state.num_input_tokens_seen or 0)
                rec = {"step": state.global_step, "epoch": round(state.epoch or 0, 4), "tokens": self.tokens,
                       "seconds": round(time.time() - self.t0, 2), **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
                if rec["seconds"] > 0:
                    rec["tokens_per_s"] = round(self.tokens / rec["seconds"], 1)
                with open(self.path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(rec) + "\n")

        return Callback()


def _delta(model, base: dict) -> dict[str, torch.Tensor]:
    """W - W0 of every tensor that changed: the full-parameter patch's weights.

    Computed in fp32 and stored in the model's dtype when that is bf16 or fp16 (an fp32 delta
    of a bf16 model doubles the patch's size for precision the weights do not have: 29.5 GB
    instead of ~15 at 8B, issue 24); fp32 models keep fp32. Unchanged tensors are left out."""
    delta = {}
    with torch.no_grad():
        for n, p in model.named_parameters():
            d = p.detach().to("cpu", torch.float32) - base[n].to(torch.float32)
            if torch.count_nonzero(d):
                keep = p.dtype if p.dtype in (torch.bfloat16, torch.float16) else torch.float32
                delta[n] = d.to(keep).contiguous()
    return delta


def _snapshotter(work: Path, steps: list[int], base: dict | None):
    """A callback that writes the weights after each listed optimiser step to work/snapshots/step-N."""
    from safetensors.torch import save_file
    from transformers import TrainerCallback

    class Snapshots(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            if state.global_step not in steps or not state.is_world_process_zero:
                return
            d = work / "snapshots" / f"step-{state.global_step}"
            tmp = d.with_name(d.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            if base is None:
                model.save_pretrained(str(tmp), safe_serialization=True)
            else:
                save_file(_delta(model, base), str(tmp / DELTA_FILE), metadata={"format": "pt"})
            shutil.rmtree(d, ignore_errors=True)  # a replay after --resume writes the same step again
            tmp.rename(d)

    return Snapshots()


class _PlanError(SafetyPatchError):
    """A run's plan refused before its first step (:func:`_check_lr_plan`): nothing to resume."""


def _check_lr_plan(stop_after: float | None, snapshot_steps: list[int]):
    """A callback that refuses, before the first step, a stop or a snapshot at a step every step
    up to which runs at lr 0: transformers' warmup starts at 0, so with any warmup the first
    optimiser step changes nothing, and a run stopped (``--stop-after``) or snapshotted
    (``--snapshot-steps``) there is the base (an all-zero LoRA B, or a zero delta), which the
    patch writer refuses only after the whole run. Raises SafetyPatchError naming the flag."""
    from transformers import TrainerCallback

    class CheckPlan(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            n = state.max_steps
            zero = 1 if args.get_warmup_steps(n) >= 1 else 0  # step 1 at lr 0: the warmup's factor starts at 0
            if not zero:
                return
            if stop_after is not None and stop_after < 1 and max(round(stop_after * n), 1) <= zero:
                raise _PlanError(
                    f"optim.stop_after {stop_after:g} (--stop-after, or the recipe's) stops after step 1 of the {n} "
                    "planned, which the warmup takes at lr 0: the patch would equal the base; raise --stop-after or "
                    "train more rows/epochs")
            early = sorted(s for s in snapshot_steps if s <= zero)
            if early:
                raise _PlanError(f"--snapshot-steps lists step {early[0]}, which the warmup takes at lr 0 (of "
                                       f"{n} planned steps): its snapshot would equal the base; list later steps")

    return CheckPlan()


def _early_stop(fraction: float):
    """A callback that ends training after ``fraction`` of the planned steps; the scheduler
    keeps the whole run's plan, so the weights equal that step's snapshot of a full run."""
    from transformers import TrainerCallback

    class EarlyStop(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step >= max(round(fraction * state.max_steps), 1):
                control.should_training_stop = True

    return EarlyStop()


def _last_step():
    """A callback for the step where training ends: no checkpoint there, and a log line.

    transformers saves a full checkpoint (weights, optimiser and scheduler state) when the last
    step is reached, whatever ``save_steps`` says; the patch is written from the model in
    memory right after, and the work folder removed, so that checkpoint only costs time and disk
    (about 44 GB and 55 s at 8B, full-parameter: issue 24). Periodic checkpoints for
    ``--resume`` are kept; a run killed between its last step and the patch write resumes from
    the last of them. It logs only every ``logging_steps``, so a run whose step count is not a
    multiple never logged its last loss (and one shorter than ``logging_steps`` none:
    ``loss None -> None``); the last step is logged here, the first by ``logging_first_step``.
    Added after the trainer's own flow callback and ``_early_stop``, so it sees their decision."""
    from transformers import TrainerCallback

    class LastStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if control.should_training_stop or state.global_step >= state.max_steps:
                control.should_save = False
                control.should_log = True

    return LastStep()


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
            _rewind(work, ckpt, prior)
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
                data={"dir": str(data_dir), "manifest_sha256": manifest_sha256(data_dir), "rows": counts},
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


def _rewind(work: Path, ckpt: str, state: dict) -> None:
    """Before resuming from ``ckpt``: drop the newer checkpoints (cut short by the kill, or the
    trainer would mix their files with the replayed ones), half-written snapshots, and the
    metrics rows logged after the checkpoint's step (the resumed run logs them again)."""
    keep = Path(ckpt)
    later = False
    for p in _checkpoints(work):
        if later:
            shutil.rmtree(p)
        later = later or p == keep
    for tmp in (work / "snapshots").glob("*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    metrics = work / "metrics.jsonl"
    size = state.get("metrics_bytes", 0)
    if metrics.exists() and metrics.stat().st_size > size:
        with open(metrics, "r+b") as f:
            f.truncate(size)


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
