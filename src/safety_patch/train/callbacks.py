"""Trainer callbacks that make a run fail closed or stop where asked: a non-finite gradient,
weight or logged value stops it (``_finite_guard``), a stop or snapshot planned at a step the
warmup takes at lr 0 is refused before the first step (``_check_lr_plan``), ``--stop-after``
(``_early_stop``), no checkpoint at the last step (``_last_step``), and the metrics log
(``_Metrics``). Used by :mod:`.run`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..errors import SafetyPatchError


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
