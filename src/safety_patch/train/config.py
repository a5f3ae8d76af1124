"""TrainConfig: one schema for every arm, in groups; its defaults ARE the default recipe.

A config is ``recipe`` and ``method`` plus six groups: ``lora``, ``data`` (the training mix),
``anchor`` (the KL anchor), ``loss``, ``optim`` (optimiser and run length) and ``gate``
(``gate.config.GateFitConfig``; ``None`` = an always-on patch). Named recipes are YAML files in
``train/recipes/`` holding only what differs from these defaults; ``resolve`` layers
recipe <- YAML file <- flags (``train/api.py``). Each field's docstring is its ``--help`` text
(first paragraph), so the CLI cannot drift from the schema.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import math
import textwrap
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from ..errors import FieldError, SafetyPatchError, field_path
from ..gate.config import GateFitConfig


@dataclass
class LoraSettings:
    """The LoRA adapter (``method: lora``)."""

    rank: int = 8
    """LoRA rank r of each adapted matrix."""
    alpha: float = 16.0
    """LoRA alpha: the update is scaled by alpha / rank (> 0)."""
    dropout: float = 0.0
    """Dropout on the adapter's input, in [0, 1)."""
    target_modules: str = "all-linear"
    """Modules to adapt: all-linear, or comma-separated names such as up_proj,down_proj."""
    layers: str | None = None
    """Decoder layers to adapt, e.g. 10-19 or 4,8,12 (default: all)."""
    orthogonal_k: int = 0
    """OPLoRA-style constraint: keep the update off W0's top-k singular subspaces (0 = off).

    A is kept off W0's top-k right singular vectors and B off its top-k left ones, so
    ΔW = BA is orthogonal to W0's dominant subspaces by construction (train/oplora.py)."""


@dataclass
class DataMix:
    """Which rows train, from the data folder."""

    general_ratio: float = 0.0
    """General (self-distilled) conversations per safety conversation: the data-mixing baseline."""
    contrast_ratio: float = 0.0
    """Borderline-benign + general conversations (the base model's own answers) per safety conversation."""
    borderline_share: float | None = None
    """Share of the contrast and anchor rows drawn from borderline-benign prompts (default: in proportion).

    The rest are general prompts. Borderline prompts teach the boundary; general ones only keep
    the model answering, so the boundary needs more than its share."""
    max_train_rows: int | None = None
    """Use at most this many safety conversations, a seeded subsample (None or 0 = all)."""
    max_seq_len: int = 512
    """Longest training conversation in tokens; longer rows are dropped."""
    other_models_answers: bool = False
    """Train on answers another model wrote. The general, borderline and anchor rows are the
    base's own answers (self-distillation keeps what the base does); a data folder distilled by
    another base (its manifest's ``distillation.fingerprint``) is refused unless this is set."""


@dataclass
class AnchorSettings:
    """The KL anchor to the base model on benign answers (train/anchor.py)."""

    kl: float = 0.0
    """Weight of KL(base || patched) on benign answers added to the SFT loss (0 = off).

    Needs the data folder's self-distilled borderline/general train rows."""
    self_instruct: int = 0
    """Add up to N self-written benign requests (data build --self-instruct N) to the anchor's pool.

    The anchor only holds the prompts it sees, and ~190 hand-written ones leave most ordinary
    requests unheld (data/selfinstruct.py). Unused when anchor.kl is 0."""
    batch_size: int | None = None
    """Anchor conversations per step and process (default: the training batch size).

    Under DDP each rank takes its slice of one global anchor batch. The KL is a per-token mean,
    so this changes its variance and how many benign prompts the run holds, not its scale."""
    max_tokens: int = 48
    """Anchor only the first N answer tokens.

    Whether and how the model starts answering is what refusal training disturbs, and the KL
    cost grows with every anchored token."""


@dataclass
class LossSettings:
    """The training objective."""

    objective: str = "sft"
    """sft: refusal SFT, loss on the assistant turn only; dpo: chosen = refusal, rejected = base answer."""
    decision_tokens: int = 4
    """How many first answer tokens count as the answer-or-refuse decision."""
    decision_weight: float = 1.0
    """Weight of the decision tokens in the refusal SFT loss and the KL anchor (1 = plain mean).

    A per-token mean gives the decision 1/len of the loss and the refusal's easy remainder the
    rest; weighting it puts the gradient where harmful and benign prompts must part."""
    dpo_beta: float = 0.1
    """DPO's beta: the strength of its implicit KL to the reference (objective dpo)."""


@dataclass
class OptimSettings:
    """The optimiser, the schedule and the run's length and checkpoints."""

    epochs: float = 1.0
    """Passes over the training rows."""
    lr: float | None = None
    """Learning rate (default: 2e-4 for LoRA, 1e-5 for full)."""
    batch_size: int = 8
    """Training conversations per step and process."""
    micro_batch_size: int | None = None
    """Conversations per forward/backward pass: each batch of ``batch_size`` runs in passes of
    this many (the largest divisor of ``batch_size`` not above it), its gradients summed and its
    loss normalised over the whole batch's supervised tokens, so a step sees the same rows and
    the same loss as one pass (the KL anchor's batch is still drawn and scored once per batch);
    the adapter differs by float rounding only (relative 8e-8 after 4 steps of the embedded
    model, bench/train_throughput.py). None: 1 on a CPU, where a pass of one row pads nothing
    (session 28, docs/benchmarks.md: 1.64x one pass of 8 with recomputation on the bench's 96
    rows, 1.05x over the default's whole set, the same peak memory); the whole batch on an
    accelerator. Supervised fine-tuning only: a DPO run passes its whole batch at once."""
    grad_accum: int = 1
    """Gradient accumulation steps per optimiser step."""
    warmup_ratio: float = 0.05
    """Learning-rate warm-up, as a fraction of the planned steps, in [0, 1)."""
    scheduler: str = "cosine"
    """Learning-rate schedule (a transformers SchedulerType name)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    seed: int = 0
    """Seed of the row subsample, the batch order, the initialisation and the gate's prompt pool."""
    sampling: str = "group_by_length"
    """Batch order: group_by_length (little padding), random, or sequential."""
    gradient_checkpointing: bool | None = None
    """Recompute each decoder layer's activations in the backward pass instead of keeping them:
    the same adapter bit for bit, resident memory at a fraction, slower (0.69× over the default's
    74 steps in bench/train_throughput.py's same-run A/B; docs/benchmarks.md). None: off on a
    CPU, where passes of one row (``micro_batch_size``) keep a step's activations small without
    it (embedded model, peak RSS 1.8 GB; session 28), on on an accelerator, where a pass holds
    the whole batch. Set true for long rows or models whose one-row activations do not fit."""
    stop_after: float | None = None
    """Stop after this fraction of the planned steps, the schedule kept, e.g. 0.685.

    Early stopping at a point chosen on validation, without re-planning the learning-rate
    schedule."""
    snapshot_steps: str | None = None
    """Also keep the patch after these optimiser steps, e.g. 10,20,30 (PATCH/snapshots/step-N).

    Early stopping on a validation score picks one afterwards (experiments/recipe_sweep.py)."""
    save_steps: int = 50
    """Checkpoint every N optimiser steps (for --resume)."""
    logging_steps: int = 5
    """Log the loss every N optimiser steps (metrics.jsonl)."""


@dataclass
class TrainConfig:
    """Every setting of a training run. ``TrainConfig()`` is the default recipe."""

    recipe: str = "default"
    """Named recipe applied before the YAML file and flags: a file in train/recipes/."""
    method: str = "lora"
    """lora: a PEFT LoRA adapter; full: every weight trains, saved as a delta."""
    lora: LoraSettings = field(default_factory=LoraSettings)
    data: DataMix = field(default_factory=DataMix)
    anchor: AnchorSettings = field(default_factory=AnchorSettings)
    loss: LossSettings = field(default_factory=LossSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    gate: GateFitConfig | None = field(default_factory=GateFitConfig)
    """The gate fit beside the adapter (LoRA only); None = the adapter is always on."""

    @property
    def gated(self) -> bool:
        return self.gate is not None

    def resolved_lr(self) -> float:
        return self.optim.lr if self.optim.lr is not None else (2e-4 if self.method == "lora" else 1e-5)

    def gate_for_run(self) -> GateFitConfig:
        """The gate settings a training run fits with: its prompt pool is drawn with the run's seed
        (``optim.seed``), as it always was. Raises ``SafetyPatchError`` when the config has no gate."""
        if self.gate is None:
            raise SafetyPatchError("this config has no gate (gate: null / --no-gate)")
        return replace(self.gate, seed=self.optim.seed)

    def record(self) -> dict:
        """The config as a nested dict with the learning rate resolved: what ``patch.json`` and
        the resume check record."""
        d = dataclasses.asdict(self)
        d["optim"]["lr"] = self.resolved_lr()
        if d["gate"] is not None:
            d["gate"]["seed"] = self.optim.seed  # what the run draws its gate prompts with
        return d

    def validate(self) -> None:
        """Check every field at the boundary, before any work (the CLI, YAML files and the Python
        API all pass here). Raises ``SafetyPatchError`` with one line naming the field (its
        ``--flag`` where the CLI has one, else ``group.field``) and the value."""
        _check_types(self)
        if self.recipe not in recipe_names():
            raise SafetyPatchError(unknown_recipe(self.recipe))
        if self.method not in ("lora", "full"):
            raise FieldError(f"--method must be lora or full, got {self.method!r}", "method")
        lo, da, an, ls, op, g = self.lora, self.data, self.anchor, self.loss, self.optim, self.gate
        if ls.objective not in ("sft", "dpo"):
            raise FieldError(f"--objective must be sft or dpo, got {ls.objective!r}", "loss.objective")
        # Ranges. NaN fails every comparison (`nan <= 0` is False), so each bound is written as
        # "not ok" and every float is checked for finiteness: here, or in _check_types.
        for key in _POSITIVE:
            if _get(self, key) is not None:  # lr None = the method's default
                _positive(self, key)
        _at_least(self, "lora.rank", 1)
        if not 0 <= lo.dropout < 1:
            raise FieldError(f"{field_label('lora.dropout')} must be in [0, 1), got {lo.dropout!r}", "lora.dropout")
        if not lo.target_modules.strip(","):
            raise FieldError(f"{field_label('lora.target_modules')} must be all-linear or name modules, "
                             f"got {lo.target_modules!r}", 'lora.target_modules')
        for key in ("data.general_ratio", "data.contrast_ratio", "anchor.kl", "optim.weight_decay",
                    "anchor.self_instruct", "lora.orthogonal_k"):
            _at_least(self, key, 0)
        for key in ("optim.batch_size", "optim.grad_accum", "data.max_seq_len", "anchor.max_tokens",
                    "loss.decision_tokens", "optim.save_steps", "optim.logging_steps"):
            _at_least(self, key, 1)
        if an.batch_size is not None:
            _at_least(self, "anchor.batch_size", 1)
        if op.micro_batch_size is not None:
            _at_least(self, "optim.micro_batch_size", 1)
        if da.max_train_rows is not None:
            _at_least(self, "data.max_train_rows", 0)  # 0 = all rows
        if not 0 <= op.warmup_ratio < 1:
            raise FieldError(f"{field_label('optim.warmup_ratio')} must be in [0, 1), a fraction of the steps; "
                             f"got {op.warmup_ratio!r}", 'optim.warmup_ratio')
        if not 0 <= op.seed < 2**32:  # numpy's seed range
            raise FieldError(f"{field_label('optim.seed')} must be in [0, 2**32), got {op.seed!r}", "optim.seed")
        if op.scheduler not in _SCHEDULERS:
            raise FieldError(f"{field_label('optim.scheduler')} must be one of {', '.join(_SCHEDULERS)}, "
                             f"got {op.scheduler!r}", 'optim.scheduler')
        if an.kl > 0 and ls.objective != "sft":
            raise SafetyPatchError("--anchor-kl applies to the sft objective only (DPO has its own reference term)")
        if ls.decision_weight != 1.0 and ls.objective != "sft":
            raise SafetyPatchError("--decision-weight applies to the sft objective only")
        if lo.orthogonal_k > 0 and self.method != "lora":
            raise SafetyPatchError("--orthogonal-k constrains a LoRA adapter; it needs --method lora")
        if da.borderline_share is not None and not 0 <= da.borderline_share <= 1:
            raise FieldError(f"{field_label('data.borderline_share')} must be in [0, 1], got {da.borderline_share!r}",
                             "data.borderline_share")
        if op.sampling not in ("group_by_length", "random", "sequential"):
            raise FieldError(f"{field_label('optim.sampling')} must be group_by_length, random or sequential, "
                             f"got {op.sampling!r}", 'optim.sampling')
        if lo.layers is not None:
            _parsed(parse_layers, lo.layers, "lora.layers")
        if op.stop_after is not None and not 0 < op.stop_after <= 1:
            raise FieldError(f"{field_label('optim.stop_after')} must be in (0, 1], a fraction of the planned steps; "
                             f"got {op.stop_after!r}", 'optim.stop_after')
        if op.snapshot_steps is not None:
            _parsed(parse_steps, op.snapshot_steps, "optim.snapshot_steps")
        if g is not None:
            if g.layer is not None:
                _at_least(self, "gate.layer", 0)
            if not 0 <= g.depth <= 1:
                raise FieldError(f"{field_label('gate.depth')} must be in [0, 1], got {g.depth!r}", "gate.depth")
            for key in ("gate.l2", "gate.wrapped_benign", "gate.wrapped_harmful", "gate.self_instruct"):
                _at_least(self, key, 0)
            if g.target_fpr is not None and not 0 < g.target_fpr < 1:
                raise FieldError(f"{field_label('gate.target_fpr')} must be in (0, 1), got {g.target_fpr!r}",
                                 "gate.target_fpr")
            if g.seed not in (0, op.seed):
                # train draws the gate's prompt pool with --seed (gate_for_run): a different
                # gate.seed would be recorded but not used.
                raise FieldError(f"gate.seed {g.seed} would be ignored: train seeds the gate's prompt pool "
                                 f"with --seed ({op.seed}); leave gate.seed unset", "gate.seed")
            try:
                g.validate()  # the gate stage's own checks too (gate/config.py)
            except FieldError as e:  # its keys are the gate's own fields: name them in this config
                raise FieldError(str(e), *(f"gate.{k}" for k in e.keys)) from None


GROUPS: dict[str, type] = {"lora": LoraSettings, "data": DataMix, "anchor": AnchorSettings, "loss": LossSettings,
                           "optim": OptimSettings, "gate": GateFitConfig}
"""The config's groups and their dataclasses, in --help order."""

# The fields the `train` command takes as their own flags (today's flag names, kept when the
# config grew groups): "group.field" -> flag. Every field, flag or not, also takes
# `--set group.field=value`; errors name the flag where there is one, else group.field.
FLAGS: dict[str, str] = {
    "method": "method", "loss.objective": "objective",
    "lora.rank": "rank", "lora.alpha": "alpha", "lora.target_modules": "target-modules", "lora.layers": "layers",
    "lora.orthogonal_k": "orthogonal-k",
    "data.general_ratio": "general-ratio", "data.contrast_ratio": "contrast-ratio",
    "data.borderline_share": "borderline-share", "data.max_train_rows": "max-train-rows",
    "data.max_seq_len": "max-seq-len",
    "anchor.kl": "anchor-kl", "anchor.batch_size": "anchor-batch-size", "anchor.self_instruct": "anchor-self-instruct",
    "loss.decision_weight": "decision-weight", "loss.decision_tokens": "decision-tokens",
    "optim.epochs": "epochs", "optim.lr": "lr", "optim.batch_size": "batch-size", "optim.stop_after": "stop-after",
    "optim.snapshot_steps": "snapshot-steps", "optim.seed": "seed",
    "gate.layer": "gate-layer", "gate.depth": "gate-depth", "gate.threshold": "gate-threshold",
    "gate.self_instruct": "gate-self-instruct", "gate.wrapped_benign": "gate-wrapped-benign",
    "gate.wrapped_harmful": "gate-wrapped-harmful",
}

# The flat keys of the config before it had groups (YAML files written then use them): each
# gets one error naming its new key.
LEGACY_KEYS: dict[str, str] = {flag.replace("-", "_"): key for key, flag in FLAGS.items() if "." in key} | {
    "dropout": "lora.dropout", "anchor_max_tokens": "anchor.max_tokens", "dpo_beta": "loss.dpo_beta",
    "grad_accum": "optim.grad_accum", "warmup_ratio": "optim.warmup_ratio", "scheduler": "optim.scheduler",
    "weight_decay": "optim.weight_decay", "sampling": "optim.sampling",
    "gradient_checkpointing": "optim.gradient_checkpointing", "save_steps": "optim.save_steps",
    "logging_steps": "optim.logging_steps", "gate_l2": "gate.l2",
}

# Fields that must be finite and > 0. A learning rate or an alpha (the update's scale alpha /
# rank) of 0 makes a patch that does nothing, which evaluations would report as a patch; a
# negative alpha flips the update's sign.
_POSITIVE = ("lora.alpha", "optim.lr", "optim.epochs", "loss.decision_weight", "loss.dpo_beta")
# transformers' SchedulerType names that need no extra arguments.
_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
               "inverse_sqrt", "warmup_stable_decay")


def field_label(key: str) -> str:
    """How an error names a field: ``--max-train-rows`` for a flag, ``optim.grad_accum`` otherwise."""
    return "--" + FLAGS[key] if key in FLAGS else key


def _get(cfg: TrainConfig, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def _parsed(parse, value: str, key: str) -> None:
    """``parse(value)``, its error raised as the field's (``FieldError``)."""
    try:
        parse(value)
    except FieldError:
        raise
    except SafetyPatchError as e:
        raise FieldError(str(e), key) from None


def _at_least(cfg: TrainConfig, key: str, low: int) -> None:
    value = _get(cfg, key)
    if not value >= low:
        raise FieldError(f"{field_label(key)} must be >= {low}, got {value!r}", key)


def _positive(cfg: TrainConfig, key: str) -> None:
    value = _get(cfg, key)
    if not (math.isfinite(value) and value > 0):
        raise FieldError(f"{field_label(key)} must be a finite number > 0, got {value!r}", key)


def _allowed(typ: Any) -> tuple[list[Any], bool]:
    """(the non-None types of an annotation, whether None is allowed)."""
    union = typing.get_origin(typ) in (typing.Union, types.UnionType)
    args = typing.get_args(typ) if union else (typ,)
    return [a for a in args if a is not type(None)], type(None) in args


def _check_types(cfg: TrainConfig) -> None:
    """Each field has its declared type (a bool is not a number here), every float is finite and
    every group is its dataclass: the CLI and YAML coerce, the Python API does not."""
    kinds = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    for name, group in GROUPS.items():
        obj = getattr(cfg, name)
        if obj is None and name == "gate":
            continue
        if not isinstance(obj, group):
            raise SafetyPatchError(f"{name} must be a {group.__name__}, got {obj!r}")
    for key, typ in field_types().items():
        if key.startswith("gate.") and cfg.gate is None:
            continue
        value = _get(cfg, key)
        allowed, nullable = _allowed(typ)
        if value is None:
            if not nullable:
                raise FieldError(f"{field_label(key)} must be set, got None", key)
            continue
        ok = False
        for a in allowed:
            if a is float:
                ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            elif a is int:
                ok = isinstance(value, int) and not isinstance(value, bool)
            elif typing.get_origin(a) in (list, tuple):
                inner = (typing.get_args(a) or (str,))[0]
                inner = (int, float) if inner is float else inner  # a whole number is a number
                ok = isinstance(value, (list, tuple)) and all(isinstance(v, inner) and not isinstance(v, bool)
                                                              for v in value)
            else:
                ok = isinstance(value, a)
            if ok:
                break
        if not ok:
            raise FieldError(f"{field_label(key)} must be {' or '.join(kinds.get(a, str(a)) for a in allowed)}, "
                             f"got {value!r}", key)
        if isinstance(value, float) and not math.isfinite(value) and key not in _POSITIVE:  # those: _positive
            raise FieldError(f"{field_label(key)} must be a finite number, got {value!r}", key)


@functools.cache
def field_types() -> dict[str, Any]:
    """Every settable field as ``"group.field"`` (or ``"method"``) -> its annotation."""
    out: dict[str, Any] = {"method": str}
    for name, group in GROUPS.items():
        for f, typ in typing.get_type_hints(group).items():
            if f in {x.name for x in fields(group)}:
                out[f"{name}.{f}"] = typ
    return out


@functools.cache
def field_docs() -> dict[str, str]:
    """Every field's docstring (the string literal under it in the class body), as
    ``"group.field"`` -> text, read from the source with ``ast``: the --help text of the CLI."""
    out: dict[str, str] = {}
    for prefix, cls in [("", TrainConfig), *((f"{n}.", c) for n, c in GROUPS.items())]:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
        body = tree.body[0].body  # type: ignore[attr-defined]
        for stmt, nxt in zip(body, body[1:], strict=False):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant) and isinstance(nxt.value.value, str)):
                out[prefix + stmt.target.id] = inspect.cleandoc(nxt.value.value)
    return out


def help_text(key: str) -> str:
    """The first paragraph of a field's docstring, on one line."""
    return " ".join(field_docs().get(key, "").split("\n\n")[0].split())


# --- building a config from layers (recipe file <- YAML file <- flags) ------------------------

# Settings written as comma-separated text on the command line; in YAML a list is the natural form.
COMMA_LISTS = ("lora.target_modules", "lora.layers")


def _coerce_value(key: str, value: Any, where: str) -> Any:
    from ..config import _coerce

    if key in COMMA_LISTS and isinstance(value, (list, tuple)) and value:
        # module names are names (a 3 in the list is a slip, not a module); layers are numbers or "a-b" ranges
        item = str if key == "lora.target_modules" else (str, int)
        bad = [v for v in value if not isinstance(v, item) or isinstance(v, bool)]
        if bad:
            raise FieldError(f"{where}: {key}: list item {bad[0]!r} is not a "
                             f"{'module name' if item is str else 'layer number or range'}", key)
        value = ",".join(str(v).strip() for v in value)
    return _coerce(value, field_types()[key], f"{where}: {key}")


def check_layer(values: Any, where: str) -> dict[str, Any]:
    """One layer of settings (a recipe file, a YAML file, flags) in grouped form -> a nested dict of
    coerced values. Raises ``SafetyPatchError`` naming ``where`` and the key for an unknown key, a
    flat key of the old schema (naming its new key), a group that is not a mapping, or a value
    that is not of the field's type."""
    if not isinstance(values, Mapping):
        raise SafetyPatchError(f"{where}: expected a mapping of config keys, got {values!r}")
    out: dict[str, Any] = {}
    for k, v in values.items():
        if k == "recipe":
            if not isinstance(v, str):
                raise SafetyPatchError(f"{where}: recipe must be a name, got {v!r}")
            out[k] = v
        elif k == "method":
            out[k] = _coerce_value(k, v, where)
        elif k in GROUPS:
            if v is None and k == "gate":
                out[k] = None  # an always-on patch
                continue
            if not isinstance(v, Mapping):
                raise SafetyPatchError(f"{where}: {k} must be a mapping of {k}.* keys"
                                       + (" (or null: no gate)" if k == "gate" else "") + f", got {v!r}")
            group = {}
            for f, fv in v.items():
                key = f"{k}.{f}"
                if key not in field_types():
                    valid = ", ".join(x.split(".", 1)[1] for x in field_types() if x.startswith(k + "."))
                    raise SafetyPatchError(f"{where}: unknown key {field_path((k, f))}; {k} has {valid}")
                group[f] = _coerce_value(key, fv, where)
            out[k] = group
        elif k in LEGACY_KEYS:
            raise SafetyPatchError(f"{where}: {k} is now {LEGACY_KEYS[k]} (write it as {_nested(LEGACY_KEYS[k])})")
        else:
            raise SafetyPatchError(f"{where}: unknown key {k!r}; valid: recipe, method, {', '.join(GROUPS)}")
    return out


def _nested(key: str) -> str:
    group, f = key.split(".")
    return f"{group}: {{{f}: ...}}"


def dotted_layer(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``{"lora.rank": 16, "gate": None}`` -> ``{"lora": {"rank": 16}, "gate": None}`` (then check it
    with ``check_layer``)."""
    out: dict[str, Any] = {}
    for key, v in values.items():
        if "." in key:
            group, f = key.split(".", 1)
            if group not in GROUPS or out.get(group, {}) is None:
                if group not in GROUPS:
                    raise SafetyPatchError(f"{where}: unknown key {field_path((group, f))}; groups: {', '.join(GROUPS)}")
                raise SafetyPatchError(f"{where}: {key} conflicts with gate = null (--no-gate)")
            out.setdefault(group, {})[f] = v
        elif key == "gate" and v is None:
            if out.get("gate"):
                raise SafetyPatchError(f"{where}: --no-gate conflicts with "
                                       + ", ".join(field_label("gate." + f) for f in out["gate"]))
            out["gate"] = None
        else:
            out[key] = v
    return out


def merge(layers: list[dict[str, Any]]) -> TrainConfig:
    """Apply checked layers (``check_layer``) in order over the defaults; not validated. A gate
    setting on a config without a gate turns the gate on with its defaults."""
    base = {"recipe": TrainConfig.recipe, "method": TrainConfig.method}
    groups: dict[str, dict | None] = {n: dataclasses.asdict(c()) for n, c in GROUPS.items()}
    for layer in layers:
        for k, v in layer.items():
            if k == "gate" and v is not None:
                v = _one_threshold(v)
            if k in GROUPS:
                if v is None:
                    groups[k] = None
                else:
                    groups[k] = (groups[k] if groups[k] is not None else dataclasses.asdict(GROUPS[k]())) | v
            else:
                base[k] = v
    return TrainConfig(**base, **{n: None if d is None else GROUPS[n](**d) for n, d in groups.items()})


def _one_threshold(gate: Mapping[str, Any]) -> dict[str, Any]:
    """A gate layer that gives ``threshold`` or ``target_fpr`` but not the other also clears the
    other: they are two ways to set one number (gate.config.GateFitConfig), so a layer that sets a
    logit replaces the default target rate instead of conflicting with it, and the default
    out-of-family raise of that rate (``family_fpr``) with it."""
    out = dict(gate)
    if "threshold" in out and "target_fpr" not in out:
        out["target_fpr"] = None
        out.setdefault("family_fpr", None)
    elif "target_fpr" in out and "threshold" not in out:
        out["threshold"] = None
    return out


def override(cfg: TrainConfig, values: Mapping[str, Any]) -> TrainConfig:
    """A copy of ``cfg`` with ``{"group.field": value}`` (``"method"``, ``"recipe"``, ``"gate": None``)
    set as given: no coercion and no validation (call ``validate``). For the Python API and tests;
    unknown keys raise ``SafetyPatchError``."""
    out = replace(cfg)
    gate = _one_threshold({k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("gate.")})
    values = {k: v for k, v in values.items() if not k.startswith("gate.")} | {f"gate.{k}": v for k, v in gate.items()}
    for key, v in values.items():
        if "." not in key:
            if key not in ("recipe", "method", *GROUPS):
                raise SafetyPatchError(f"unknown config key {key!r}")
            setattr(out, key, v)
            continue
        if key not in field_types():
            raise SafetyPatchError(f"unknown config key {key!r}")
        group, f = key.split(".")
        current = getattr(out, group)
        setattr(out, group, replace(current if current is not None else GROUPS[group](), **{f: v}))
    return out


# --- named recipes -------------------------------------------------------------------------------

RECIPE_DIR = Path(__file__).parent / "recipes"

# Recipes that left the code, with the role name that replaced them, or None (retired; the exact
# settings are in docs/lab-notebook.md, "Recipes retired from the code").
# anchor-v1's settings live on unchanged as the recipe of red-teaming rounds.
RETIRED: dict[str, str | None] = {"gated": "default", "anchor-v2": "always-on",
                                  "anchor-v1": "redteam-round", "gated-v1": None, "anchor-si": None}


def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def unknown_recipe(name: str) -> str:
    """The one-line error for a recipe name that is not a file in train/recipes/."""
    if name in RETIRED:
        new = RETIRED[name]
        if new:
            return f"recipe {name!r} is now called {new!r} (--recipe {new})"
        return (f"recipe {name!r} was retired; its settings are recorded in docs/lab-notebook.md "
                f"(\"Recipes retired from the code\"); current recipes: {', '.join(recipe_names())}")
    return f"unknown recipe {name!r}; valid: {', '.join(recipe_names())}"


def recipe_layer(name: str) -> dict[str, Any]:
    """The named recipe's file as a checked layer (what differs from the defaults)."""
    from ..config import read_yaml

    if name not in recipe_names():
        raise SafetyPatchError(unknown_recipe(name))
    path = RECIPE_DIR / f"{name}.yaml"
    return check_layer(read_yaml(path), str(path))


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
        raise SafetyPatchError(f"--layers must look like '10-19' or '4,8,12', got {spec!r}") from None
    if not out:
        raise SafetyPatchError(f"--layers {spec!r} names no layer")
    return sorted(set(out))


def parse_steps(spec: str) -> list[int]:
    """ "10,20,30" -> [10, 20, 30] (positive step numbers)."""
    try:
        steps = sorted({int(x) for x in str(spec).split(",") if x.strip()})
    except ValueError:
        raise SafetyPatchError(f"--snapshot-steps must look like '10,20,30', got {spec!r}") from None
    if not steps or steps[0] < 1:
        raise SafetyPatchError(f"--snapshot-steps must name positive step numbers, got {spec!r}")
    return steps
