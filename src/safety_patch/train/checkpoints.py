"""A training run's work folder: checkpoints complete or not, the run's identity and the check
that a ``--resume`` keeps it, weight snapshots, and the full-parameter delta (``_delta``).

Layout (``_work_dir``): ``.<out>.partial/`` beside the output holds ``run.json`` (``RUN_FILE``),
``checkpoints/checkpoint-N`` (each complete once ``CHECKPOINT_STATE`` is written into it, last),
``snapshots/step-N`` and ``metrics.jsonl``. Used by :mod:`.run`.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from pathlib import Path

import torch

from ..atomic import write_json
from ..errors import SafetyPatchError
from ..patches import DELTA_FILE


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


def _rewind(work: Path, ckpt: str, state: dict) -> list[str]:
    """Before resuming from ``ckpt``: drop the newer checkpoints (cut short by the kill, or the
    trainer would mix their files with the replayed ones), half-written snapshots, and the
    metrics rows logged after the checkpoint's step (the resumed run logs them again). Returns
    the names of the checkpoints dropped."""
    keep = Path(ckpt)
    later, dropped = False, []
    for p in _checkpoints(work):
        if later:
            shutil.rmtree(p)
            dropped.append(p.name)
        later = later or p == keep
    for tmp in (work / "snapshots").glob("*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    metrics = work / "metrics.jsonl"
    size = state.get("metrics_bytes", 0)
    if metrics.exists() and metrics.stat().st_size > size:
        with open(metrics, "r+b") as f:
            f.truncate(size)
    return dropped
