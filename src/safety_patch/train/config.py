"""TrainConfig: one schema for every arm; named recipes are presets of its fields."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from ..errors import SafetyPatchError


@dataclass
class TrainConfig:
    recipe: str = "default"
    """Named preset applied before the YAML file and flags (see ``RECIPES``)."""
    method: str = "lora"
    """lora: a PEFT LoRA adapter; full: every weight trains, saved as a delta."""
    objective: str = "sft"
    """sft: refusal SFT, loss on the assistant turn only; dpo: chosen=refusal vs rejected=base answer."""
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: str = "all-linear"
    """PEFT target modules: all-linear, or comma-separated names such as up_proj,down_proj."""
    layers: str | None = None
    """Layers to adapt, e.g. "10-19" or "4,8,12" (LoRA only); default all."""
    general_ratio: float = 0.0
    """General (self-distilled) conversations per safety conversation: the data-mixing baseline."""
    contrast_ratio: float = 0.0
    """Borderline-benign + benign conversations (base model's own answers) per safety conversation."""
    borderline_share: float | None = None
    """Fraction of the contrast rows drawn from borderline-benign prompts (the rest: general
    prompts). None = in proportion to the two pools. Borderline prompts teach the boundary;
    general ones only keep the model answering, so the boundary needs more than its share."""
    anchor_kl: float = 0.0
    """Weight of KL(base || patched) on benign answers added to the SFT loss (0 = off); see
    train/anchor.py. Needs the data folder's self-distilled borderline/general train rows."""
    anchor_self_instruct: int = 0
    """Add up to N rows of the data folder's selfinstruct.jsonl (benign requests the base model
    wrote itself, ``data build --self-instruct N``) to the anchor's general pool: the anchor
    only holds the prompts it sees, and ~190 hand-written ones leave most ordinary requests
    unheld (data/selfinstruct.py). Unused when anchor_kl is 0."""
    anchor_batch_size: int | None = None
    """Anchor conversations per step and process, like batch_size (None = batch_size; under DDP
    each rank takes its slice of one global anchor batch). The KL is a per-token mean,
    so this changes its variance and how many benign prompts the run holds, not its scale:
    at batch 8 a 73-step run sees ~300 general prompts, a third of a self-instruct pool."""
    anchor_max_tokens: int = 48
    """Anchor only the first N answer tokens: whether and how the model starts answering is
    what refusal training disturbs, and the KL cost grows with every anchored token."""
    decision_tokens: int = 4
    """The first N answer tokens, where a model commits to answering or refusing."""
    decision_weight: float = 1.0
    """Weight of those tokens in the refusal SFT loss and in the KL anchor (1 = plain per-token
    mean). A per-token mean gives the decision 1/len of the loss and the refusal's easy
    remainder the rest; weighting it puts the gradient where harmful and benign prompts
    must part (train/anchor.py)."""
    orthogonal_k: int = 0
    """OPLoRA-style constraint (LoRA only; 0 = off): keep A off W0's top-k right singular
    vectors and B off its top-k left ones, so ΔW = BA is orthogonal to W0's dominant
    subspaces by construction (train/oplora.py)."""
    epochs: float = 1.0
    lr: float | None = None
    """Learning rate; default 2e-4 for LoRA, 1e-5 for full."""
    batch_size: int = 8
    grad_accum: int = 1
    max_seq_len: int = 1024
    max_train_rows: int | None = None
    """Use at most this many safety conversations (seeded subsample); None or 0 = all."""
    warmup_ratio: float = 0.05
    scheduler: str = "cosine"
    weight_decay: float = 0.0
    seed: int = 0
    sampling: str = "group_by_length"
    """Batch order: group_by_length (little padding), random, or sequential."""
    gradient_checkpointing: bool = False
    """Recompute activations to save memory (slower); useful for 7B+ models."""
    dpo_beta: float = 0.1
    snapshot_steps: str | None = None
    """Also keep the patch as it was after these optimiser steps, e.g. "10,20,30", as complete
    patches under <out>/snapshots/step-N/: early stopping on a validation score picks one
    afterwards (experiments/recipe_sweep.py does), without a training run per step count."""
    stop_after: float | None = None
    """Stop after this fraction of the planned optimiser steps, with the learning-rate schedule
    still planned for the whole run: early stopping at a point chosen on validation (the
    default's 0.685 is step 50 of 73, its best snapshot in experiments/recipe_sweep.py)."""
    gate_layer: int | None = None
    """Gate the patch (gate.py; LoRA only): a logistic probe on this decoder layer's output at
    the last prompt token, fit on the train split, decides per prompt whether the adapter
    applies; prompts it passes get the base model exactly. None = see gate_depth."""
    gate_depth: float | None = None
    """The gate's layer as a fraction of the model's depth (0.5: layer 15 of 30, 16 of 32), for
    recipes meant to carry across models; gate_layer wins when both are set. Both None = the
    adapter is always on."""
    gate_threshold: float = 1.0
    """Probe logit above which the gate fires: higher refuses fewer safe prompts and lets
    more attacks through (chosen on the validation split, experiments/recipe_sweep.py)."""
    gate_l2: float = 1e-2
    """L2 penalty of the probe (on standardised features)."""
    gate_wrapped_benign: int = 200
    """Benign train prompts wrapped in train jailbreak templates as gate negatives, so that
    a template alone does not fire the gate (train/data.py:gate_prompts)."""
    gate_wrapped_harmful: int = 0
    """Harmful train requests wrapped in train jailbreak templates added to the gate's harmful
    side (beside the train rows, 30% of which are wrapped): with wrapped requests on both sides
    in numbers, what separates them is the request inside, not the template."""
    gate_self_instruct: int = 0
    """Add up to N prompts of the data folder's selfinstruct.jsonl (ordinary requests the base
    model wrote itself, `data build --self-instruct N`) to the gate's negatives: the hand-written
    general prompts alone are too few for the probe to know what ordinary requests look like."""
    save_steps: int = 50
    """Checkpoint every N optimiser steps (for --resume)."""
    logging_steps: int = 5

    @property
    def gated(self) -> bool:
        return self.gate_layer is not None or self.gate_depth is not None

    def resolved_gate_layer(self, n_layers: int) -> int:
        if self.gate_layer is not None:
            return self.gate_layer
        return min(int(self.gate_depth * n_layers), n_layers - 1)  # type: ignore[operator]

    def resolved_lr(self) -> float:
        return self.lr if self.lr is not None else (2e-4 if self.method == "lora" else 1e-5)

    def validate(self) -> None:
        """Check every field at the boundary, before any work (the CLI, YAML files and the Python
        API all pass here). Raises ``SafetyPatchError`` with one line naming the field (its
        ``--flag`` where the CLI has one) and the value."""
        self._check_types()
        if self.recipe not in RECIPES:
            raise SafetyPatchError(f"unknown recipe {self.recipe!r}; valid: {', '.join(sorted(RECIPES))}")
        if self.method not in ("lora", "full"):
            raise SafetyPatchError(f"--method must be lora or full, got {self.method!r}")
        if self.objective not in ("sft", "dpo"):
            raise SafetyPatchError(f"--objective must be sft or dpo, got {self.objective!r}")
        # Ranges. NaN fails every comparison (`nan <= 0` is False), so each bound is written as
        # "not ok" and every float is checked for finiteness: here, or in _check_types.
        for f in _POSITIVE:
            if getattr(self, f) is not None:  # lr None = the method's default
                _positive(self, f)
        _at_least(self, "rank", 1)
        if not 0 <= self.dropout < 1:
            raise SafetyPatchError(f"{_name('dropout')} must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules.strip(","):
            raise SafetyPatchError(f"{_name('target_modules')} must be all-linear or name modules, got {self.target_modules!r}")
        for f in ("general_ratio", "contrast_ratio", "anchor_kl", "weight_decay", "gate_l2"):
            _at_least(self, f, 0)
        for f in ("anchor_self_instruct", "orthogonal_k", "gate_wrapped_benign", "gate_wrapped_harmful", "gate_self_instruct"):
            _at_least(self, f, 0)
        for f in ("batch_size", "grad_accum", "max_seq_len", "anchor_max_tokens", "decision_tokens", "save_steps",
                  "logging_steps"):
            _at_least(self, f, 1)
        if self.anchor_batch_size is not None:
            _at_least(self, "anchor_batch_size", 1)
        if self.max_train_rows is not None:
            _at_least(self, "max_train_rows", 0)  # 0 = all rows
        if not 0 <= self.warmup_ratio < 1:
            raise SafetyPatchError(f"{_name('warmup_ratio')} must be in [0, 1), a fraction of the steps; got {self.warmup_ratio!r}")
        if not 0 <= self.seed < 2**32:  # numpy's seed range
            raise SafetyPatchError(f"{_name('seed')} must be in [0, 2**32), got {self.seed!r}")
        if self.scheduler not in _SCHEDULERS:
            raise SafetyPatchError(f"{_name('scheduler')} must be one of {', '.join(_SCHEDULERS)}, got {self.scheduler!r}")
        if self.anchor_kl > 0 and self.objective != "sft":
            raise SafetyPatchError("anchor_kl applies to the sft objective only (DPO has its own reference term)")
        if self.decision_weight != 1.0 and self.objective != "sft":
            raise SafetyPatchError("decision_weight applies to the sft objective only")
        if self.orthogonal_k > 0 and self.method != "lora":
            raise SafetyPatchError("orthogonal_k constrains a LoRA adapter; it needs --method lora")
        if self.borderline_share is not None and not 0 <= self.borderline_share <= 1:
            raise SafetyPatchError(f"{_name('borderline_share')} must be in [0, 1], got {self.borderline_share!r}")
        if self.sampling not in ("group_by_length", "random", "sequential"):
            raise SafetyPatchError(f"sampling must be group_by_length, random or sequential, got {self.sampling!r}")
        if self.layers is not None:
            parse_layers(self.layers)
        if self.stop_after is not None and not 0 < self.stop_after <= 1:
            raise SafetyPatchError(f"{_name('stop_after')} must be in (0, 1], a fraction of the planned steps; got {self.stop_after!r}")
        if self.snapshot_steps is not None:
            parse_steps(self.snapshot_steps)
        if self.gated:
            if self.method != "lora":
                raise SafetyPatchError("gate_layer/gate_depth gate a LoRA adapter; they need --method lora")
            if self.gate_layer is not None:
                _at_least(self, "gate_layer", 0)
            if self.gate_depth is not None and not 0 <= self.gate_depth <= 1:
                raise SafetyPatchError(f"{_name('gate_depth')} must be in [0, 1], got {self.gate_depth!r}")

    def _check_types(self) -> None:
        """Each field has its declared type (a bool is not a number here) and every float is
        finite: the CLI and YAML coerce, the Python API does not."""
        import typing

        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value, typ = getattr(self, f.name), hints[f.name]
            allowed = [a for a in (typing.get_args(typ) or (typ,)) if a is not type(None)]
            if value is None:
                if len(allowed) == len(typing.get_args(typ) or (typ,)):
                    raise SafetyPatchError(f"{_name(f.name)} must be set, got None")
                continue
            ok = False
            for a in allowed:
                if a is float:
                    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
                elif a is int:
                    ok = isinstance(value, int) and not isinstance(value, bool)
                else:
                    ok = isinstance(value, a)
                if ok:
                    break
            if not ok:
                kinds = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
                raise SafetyPatchError(f"{_name(f.name)} must be {' or '.join(kinds.get(a, a.__name__) for a in allowed)}, "
                                       f"got {value!r}")
            if isinstance(value, float) and not math.isfinite(value) and f.name not in _POSITIVE:  # those: _positive
                raise SafetyPatchError(f"{_name(f.name)} must be a finite number, got {value!r}")


# TrainConfig fields that the `train` command takes as flags: errors name the flag; the rest
# (YAML-only) are named as config keys.
_FLAGS = frozenset({
    "recipe", "method", "objective", "rank", "alpha", "target_modules", "layers", "general_ratio", "contrast_ratio",
    "borderline_share", "anchor_kl", "anchor_batch_size", "anchor_self_instruct", "decision_weight", "decision_tokens",
    "orthogonal_k", "epochs", "lr", "batch_size", "max_seq_len", "max_train_rows", "stop_after", "snapshot_steps",
    "gate_layer", "gate_depth", "gate_threshold", "gate_self_instruct", "gate_wrapped_benign", "gate_wrapped_harmful",
    "seed",
})
# Fields that must be finite and > 0. A learning rate or an alpha (the update's scale alpha /
# rank) of 0 makes a patch that does nothing, which evaluations would report as a patch; a
# negative alpha flips the update's sign.
_POSITIVE = ("alpha", "lr", "epochs", "decision_weight", "dpo_beta")
# transformers' SchedulerType names that need no extra arguments.
_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
               "inverse_sqrt", "warmup_stable_decay")


def _name(field_name: str) -> str:
    """How an error names a field: ``--max-train-rows`` for a flag, ``grad_accum`` for a YAML-only key."""
    return "--" + field_name.replace("_", "-") if field_name in _FLAGS else field_name


def _at_least(cfg: TrainConfig, field_name: str, low: int) -> None:
    value = getattr(cfg, field_name)
    if not value >= low:
        raise SafetyPatchError(f"{_name(field_name)} must be >= {low}, got {value!r}")


def _positive(cfg: TrainConfig, field_name: str) -> None:
    value = getattr(cfg, field_name)
    if not (math.isfinite(value) and value > 0):
        raise SafetyPatchError(f"{_name(field_name)} must be a finite number > 0, got {value!r}")

def parse_layers(spec: str) -> list[int]:
    out: list[int] = []
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-")
                out.extend(range(int(a), int(b) + 1))
            elif part:
                out.append(int(part))
    except ValueError:
        raise SafetyPatchError(f"layers must look like '10-19' or '4,8,12', got {spec!r}") from None
    if not out:
        raise SafetyPatchError(f"layers {spec!r} names no layer")
    return sorted(set(out))


def parse_steps(spec: str) -> list[int]:
    """ "10,20,30" -> [10, 20, 30] (positive step numbers)."""
    try:
        steps = sorted({int(x) for x in str(spec).split(",") if x.strip()})
    except ValueError:
        raise SafetyPatchError(f"snapshot_steps must look like '10,20,30', got {spec!r}") from None
    if not steps or steps[0] < 1:
        raise SafetyPatchError(f"snapshot_steps must name positive step numbers, got {spec!r}")
    return steps


# Named recipes. "paper" is the claim as stated (refusal data only, LoRA r8 all-linear).
# "default" is the recipe experiments/recipe_sweep.py and experiments/gate_sweep.py select on the
# validation split (docs/lab-notebook.md): since 2026-11-28 the `gated` recipe, the paper's
# refusal-only LoRA (every train row, max 512 tokens) behind a gate, a logistic probe on one
# decoder layer's output at the last prompt token that applies the adapter only to prompts it
# flags. gated-v2 (the default since the evening of 2026-11-28): the probe reads layer 18 of 30
# (depth 0.6) and fires above logit 0.5; its negatives include 600 ordinary requests the base
# model wrote itself (selfinstruct.jsonl), so it flags fewer ordinary prompts, and 400 harmful
# and 600 benign train requests wrapped in train templates, so that the request inside a
# template decides, not the template. Chosen on the whole validation split by
# experiments/gate_sweep.py. It needs a folder from `data build` with its defaults (the 224
# train-only look-alikes and the 600 self-written requests). A gated patch cannot be merged
# or stacked under a round of `redteam`; `anchor-v2` is the best always-on recipe.
#
# anchor-v2 (the default of 2026-11-28 morning): the paper's LoRA plus a KL anchor to the base
# on benign answers (weight 8; 8 rows a step, half borderline look-alikes, half general
# prompts, all with the base model's own answers), the first 4 answer tokens weighted 8x in
# both losses, stopped after 68.5% of the schedule (step 50 of 73). It was measured on a folder
# built with --no-borderline-extra; with the look-alikes in the anchor it measured the same
# within noise (experiments/recipe_sweep.py, bx arm).
_ANCHOR_V2 = {"method": "lora", "rank": 8, "alpha": 16.0, "target_modules": "all-linear", "lr": 2e-4,
              "anchor_kl": 8.0, "borderline_share": 0.5, "decision_weight": 8.0, "decision_tokens": 4,
              "max_train_rows": None, "max_seq_len": 512, "stop_after": 0.685}
# The gate's depth is a fraction so that the recipe carries across models (0.6: layer 18 of
# SmolLM2-135M's 30, 19 of a 32-layer 7B model; middle layers are where refusal-relevant
# features are linearly readable). v1 read layer 15 at threshold 0 without self-written
# negatives: it met every validation constraint but flagged 3 of 65 ordinary test prompts,
# and their NLL drift alone broke the NLL target (docs/lab-notebook.md).
_GATED_V1 = {"method": "lora", "rank": 8, "alpha": 16.0, "target_modules": "all-linear", "lr": 2e-4,
             "general_ratio": 0.0, "contrast_ratio": 0.0, "max_train_rows": None, "max_seq_len": 512,
             "gate_depth": 0.5, "gate_threshold": 0.0}
_GATED = _GATED_V1 | {"gate_depth": 0.6, "gate_threshold": 0.5, "gate_self_instruct": 600, "gate_wrapped_harmful": 400,
                      "gate_wrapped_benign": 600}
RECIPES: dict[str, dict] = {
    "paper": {"method": "lora", "rank": 8, "alpha": 16.0, "target_modules": "all-linear", "lr": 2e-4,
              "general_ratio": 0.0, "contrast_ratio": 0.0},
    "default": dict(_GATED),
    # The default of 2026-11-28 morning and midday; the best always-on (mergeable) recipe.
    "anchor-v2": dict(_ANCHOR_V2),
    # The default of 2026-11-28 afternoon (si600-ab24-r594-anchor8-bl0.5-dw8@60), kept by name:
    # anchor-v2 with 600 self-written requests in the anchor's general pool (needs `data build
    # --self-instruct 600`), 24 anchor rows a step, stopped at step 60 of 73. It tied anchor-v2's
    # first seed on validation and lost to the two seeds pooled; training takes 2.5x as long.
    "anchor-si": _ANCHOR_V2 | {"anchor_self_instruct": 600, "anchor_batch_size": 24, "stop_after": 0.822},
    # The previous default (2026-11-27), kept by name: anchor 3, no decision weighting, 400 rows.
    "anchor-v1": {"method": "lora", "rank": 8, "alpha": 16.0, "target_modules": "all-linear", "lr": 2e-4,
                  "anchor_kl": 3.0, "borderline_share": 0.5, "max_train_rows": 400, "max_seq_len": 512},
    # The paper's refusal-only LoRA plus a gate (gate.py): a probe on layer 18's output at the
    # last prompt token, fit on the train split, applies the adapter only to prompts it flags;
    # the rest get the base model exactly. Layer and threshold: experiments/gate_sweep.py.
    "gated": dict(_GATED),
    # The default of 2026-11-28 afternoon, kept by name (layer 15, threshold 0, no self-written
    # negatives; 4 of the 5 test targets, docs/lab-notebook.md). The adapter is the same.
    "gated-v1": dict(_GATED_V1),
    "full-safety": {"method": "full", "lr": 1e-5},
    # anchor-v1's data and KL anchor with every weight trained (experiments/recipe_sweep.py,
    # full-anchor3-bl0.5): it beat anchor-v1 on the test split. Never a default: its output is
    # a full delta, not a plug-in adapter, and it needs W0 + Adam states + a frozen reference
    # copy in memory (10-18 bytes per parameter before activations: 70-130 GB at 7B).
    "full-anchor": {"method": "full", "lr": 1e-5, "anchor_kl": 3.0, "borderline_share": 0.5, "max_train_rows": 400,
                    "max_seq_len": 512},
}
