"""What a gate fit reads and how it sets its threshold: ``GateFitConfig`` (the ``gate`` group of a
training config, ``gate fit``'s flags; its defaults are the shipped gate's), how the feature
pass batches (``Batching``), and the decoder layers a config resolves to on a given model."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import FieldError, SafetyPatchError
from .phrasings import PHRASINGS

SHARED_PREFIX = "shared-prefix"
Batching = int | str | None
"""How the gate's feature pass batches prompts: ``"shared-prefix"`` reads each beginning that
many prompts share (the chat header, a jailbreak template's text before the request) once,
through a prefix tree (:mod:`.shared_prefix`; on the default pool a third of the token reads);
None = length-sorted batches of 8, the path of every gate written before session 18
(2026-12-02), bit-identical to those; an int = length-bucketed batches of at most that many
tokens (rows x padded width). All three agree to float rounding (the same arithmetic in
differently shaped matmuls)."""
BATCHING: Batching = SHARED_PREFIX
"""The default: the pass is compute-bound on the 2-core CPU, so fewer token reads is the lever
(bench/gate_fit.py)."""
MAX_BATCH = 64


_DEFAULT_EXTRA_DEPTHS = (0.7,)
"""GateFitConfig.extra_depths' default: other depths beside explicit extra_layers are refused."""


@dataclass
class GateFitConfig:
    """How a gate (probe.py) is fit: where it reads, where it fires, and its prompt pool.

    The defaults are the default recipe's gate (docs/recipes.md)."""

    layer: int | None = None
    """Decoder layer whose output the probe reads at the last prompt token; None = see depth."""
    depth: float = 0.6
    """The layer as a fraction of the model's depth (0.6: layer 18 of 30), used when layer is None,
    so that one recipe carries across models."""
    threshold: float | None = None
    """Probe logit above which the adapter applies (higher: fewer safe prompts refused, more
    attacks let through). Exactly one of threshold and target_fpr is set."""
    target_fpr: float | None = 0.03
    """The threshold is the logit at this false-positive rate on the validation pool of benign
    prompts (borderline + general + wrapped benign); the chosen logit is recorded in the gate
    file. 0.03: chosen on the seed-1 validation split (docs/lab-notebook.md, 2026-12-01) as the
    rate that keeps wrapped safe prompts routed to the adapter at or under 5%."""
    l2: float = 1e-2
    """L2 penalty of the logistic probe (on standardised features)."""
    wrapped_benign: int = 600
    """Benign train prompts wrapped in train jailbreak templates as negatives, so that a
    template alone does not fire the gate."""
    wrapped_harmful: int = 400
    """Harmful train requests wrapped in train templates added to the positives, so that the
    request inside a template decides, not the template."""
    self_instruct: int = 600
    """Ordinary requests the base model wrote itself (data build --self-instruct N) added to the
    negatives."""
    seed: int = 0
    """Seed for the prompt pool's sampling and wrapping."""
    rephrased: int = 600
    """Harmful train requests and as many benign train prompts (single-turn), each re-asked in the
    other common form (:func:`reask`: an instruction as a question, a "how to" question as an
    instruction), added to their side: phrasing alone then carries no label, so the probe must
    read the request (issue 23 item 5: the sources differ in phrasing, HarmBench instructs and
    DoNotAnswer asks)."""
    phrasings: list[str] = field(default_factory=lambda: ["reask"])
    """The phrasing families of the re-asked prompts (:data:`PHRASINGS`), each drawn ``rephrased``
    times per side: ``reask`` (an instruction as a question and back) and neutral frames
    (``context``, ``third_person``, ``hedged``, ``terse``) applied to both sides alike
    (issue 23 item 5; experiments/gate_phrasings.py measures them leave-one-source-out)."""
    written_harmful: bool = True
    """Add the 129 hand-written harmful requests of resources/gate_harmful_prompts.tsv (22 harm
    categories; ``data.prompts.gate_harmful_prompts``), each as written and re-asked, to the
    positives as a third source, ``written`` (issue 23 item 5: the pool's two sources cover
    different kinds of harm, and a probe fit on one misses the other's). On by default since
    2026-12-01 (session 14): on validation it lifts HarmBench held out from 30% to 49% caught and
    the default still meets its six targets (docs/lab-notebook.md)."""
    written_harmful_more: bool = True
    """Add 144 more hand-written harmful requests by category (resources/gate_harmful_more.tsv,
    session 25: privacy of private people and companies, hate, harassment, misinformation,
    sexual, cyber, weapons, ...) to the ``written`` source, as written and re-asked, less any near
    a validation/test request. Needs ``written_harmful``. On by default since 2026-12-02 (session
    26), with ``written_lookalikes`` and ``extra_weight`` 1.0: on validation and the seed-1 test
    split that gate met the default's targets, routed fewer wrapped safe prompts (5.6% vs 7.8%
    on test) and cut the look-alikes it fires on from 18.8% to 9.7% (cross-fit at the gate's
    rate; docs/gate.md, "A pool widened by category")."""
    written_lookalikes: bool = True
    """Add 176 hand-written safe look-alikes by category (resources/gate_lookalike_prompts.tsv,
    session 25: homonyms, figurative language, safe targets and contexts, definitions, real and
    nonsense discrimination, history, public and fictional figures' privacy, ...) to the
    negatives, as written and re-asked, less any near a validation/test look-alike or general
    prompt of the folder. `gate eval` scores a gate fit on them by cross-fitting: each line by a
    refit without its fold (``lookalike_report``).
    On by default since session 26 (see ``written_harmful_more``)."""
    extra_layers: list[int] | None = None
    """Further decoder layers read beside ``layer``, by index (a multi-layer gate: their features
    concatenated after layer's, each through the final norm for a final-norm gate); None = see
    ``extra_depths``; [] = none (a one-layer gate, which `gate export` can write as a
    transformers classifier; it refuses a multi-layer one: a classification head reads one
    layer). experiments/gate_layer_sets.py measures sets (docs/gate.md)."""
    extra_depths: list[float] = field(default_factory=lambda: list(_DEFAULT_EXTRA_DEPTHS))
    """The extra layers as fractions of the model's depth, used when ``extra_layers`` is None, so
    that one recipe carries across models (0.7: layer 21 of 30). A depth that falls on ``layer``
    or on another extra layer (models under ten layers) is read once. The default since
    2026-12-02 (session 21, docs/lab-notebook.md): with ``extra_weight`` 0.6 and ``family_fpr``
    0.05 it routed 7.8% of the seed-1 test split's wrapped safe prompts to the adapter where the
    one-layer gate routed 11.7%, meeting the other five targets (then with ``extra_weight`` 0.6 and
    without the session-25 written files)."""
    extra_weight: float = 1.0
    """Scale of the extra layers' standardised features in the fit (``gate.fit_probe``'s
    ``feature_scale``): below 1 penalises their weights more, so the probe leans on ``layer``
    (session 20: 18 + 21 at 0.6 kept layer 18's out-of-source catch where 1.0 lost 5 points on
    the narrower pool; with the session-25 written files, 1.0 caught more on validation and held
    out, docs/gate.md, so the default is 1.0 since session 26). A value other than 1 with no
    extra layer is refused (it would change nothing)."""
    family_fpr: float | None = 0.05
    """After ``target_fpr`` sets the threshold, raise it (never lower it) until at most this share
    of the *out-of-family* wrapped safe prompts fires: the train pool's wrapped prompts scored by
    refits without their template families (:func:`leave_one_family_out`'s margins). None: no
    raise. Needs ``target_fpr`` and wrapped prompts on both sides of the pool. The validation
    split's few template families (31 on the default folder) understate how often a new family's
    safe prompts fire (9.8% out of family where validation said 4.5%). 0.05 is the default since
    2026-12-02 (with the extra layer at depth 0.7: ``extra_depths``)."""
    features: str = "final-norm"
    """What the probe reads: final-norm (the hidden state after the layer through the base's final
    RMSNorm, fit without intercept: it exports exactly as a transformers sequence-classification
    checkpoint, `gate export`) or residual (the state itself, standardised, with an intercept: the
    default until 2026-12-01; on validation the two discriminate alike)."""

    def resolved_layer(self, n_layers: int) -> int:
        """The decoder layer index for a model with ``n_layers`` layers."""
        if self.layer is not None:
            return self.layer
        return min(int(self.depth * n_layers), n_layers - 1)

    def resolved_extra_layers(self, n_layers: int) -> list[int]:
        """The extra decoder layers for a model with ``n_layers`` layers, in feature order:
        ``extra_layers`` as given, else ``extra_depths`` resolved as ``depth`` is, each layer once
        and never the gate's own layer."""
        if self.extra_layers is not None:
            return list(self.extra_layers)
        first, out = self.resolved_layer(n_layers), []
        for d in self.extra_depths:
            v = min(int(d * n_layers), n_layers - 1)
            if v != first and v not in out:
                out.append(v)
        return out

    def has_extra_layers(self) -> bool:
        """Whether this config asks for extra layers at all (before resolving depths on a model)."""
        return bool(self.extra_layers) if self.extra_layers is not None else bool(self.extra_depths)

    def validate(self) -> GateFitConfig:
        """Returns self; raises SafetyPatchError (one line naming the field) for a value that cannot be used."""
        def bad(name: str, why: str) -> FieldError:
            return FieldError(f"gate config: {name} {why}, got {getattr(self, name)!r}", name)

        if self.layer is not None and (isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0):
            raise bad("layer", "must be an integer >= 0")
        if (self.threshold is None) == (self.target_fpr is None):
            # a FieldError, so a config file that set them is named with its line (a user's trial got no file)
            raise FieldError("gate config: set exactly one of threshold (a logit) and target_fpr (a false-positive "
                             f"rate on validation), got threshold {self.threshold!r}, target_fpr {self.target_fpr!r}"
                             " (e.g. --set gate.target_fpr=null with gate.threshold)", "threshold", "target_fpr")
        for name in ("depth", "l2") + (("threshold",) if self.threshold is not None else ()):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise bad(name, "must be a finite number")
        if not 0 <= self.depth <= 1:
            raise bad("depth", "must be in [0, 1]")
        if self.l2 < 0:
            raise bad("l2", "must be >= 0")
        if self.target_fpr is not None and (isinstance(self.target_fpr, bool) or not isinstance(self.target_fpr, (int, float))
                                            or not 0 < self.target_fpr < 1):
            raise bad("target_fpr", "must be a number in (0, 1)")
        for name in ("written_harmful", "written_harmful_more", "written_lookalikes"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "must be true or false")
        if self.written_harmful_more and not self.written_harmful:
            raise SafetyPatchError("gate config: written_harmful_more adds to the hand-written source, and written_harmful "
                                   "is off (turn both on, or both off: gate fit --no-written-harmful, train --set "
                                   "gate.written_harmful=false --set gate.written_harmful_more=false)")
        for name in ("wrapped_benign", "wrapped_harmful", "self_instruct", "seed", "rephrased"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise bad(name, "must be an integer >= 0")
        if (not isinstance(self.phrasings, (list, tuple)) or not self.phrasings
                or any(f not in PHRASINGS for f in self.phrasings) or len(set(self.phrasings)) != len(self.phrasings)):
            raise bad("phrasings", f"must be a non-empty list of distinct names from {', '.join(PHRASINGS)}")
        if self.features not in FEATURES:
            raise bad("features", f"must be one of {', '.join(FEATURES)}")
        if self.extra_layers is not None and (
                not isinstance(self.extra_layers, (list, tuple))
                or any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in self.extra_layers)
                or len(set(self.extra_layers)) != len(self.extra_layers)):
            raise bad("extra_layers", "must be null or a list of distinct integers >= 0")
        if (not isinstance(self.extra_depths, (list, tuple))
                or any(isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and 0 <= v <= 1)
                       for v in self.extra_depths)):
            raise bad("extra_depths", "must be a list of numbers in [0, 1]")
        if len(set(self.extra_depths)) != len(self.extra_depths):
            raise bad("extra_depths", "must be distinct")
        if self.extra_layers is not None and tuple(self.extra_depths) != _DEFAULT_EXTRA_DEPTHS:
            raise SafetyPatchError(f"gate config: extra_layers {self.extra_layers} and extra_depths "
                                   f"{list(self.extra_depths)} both place the extra layers; set one")
        v = self.extra_weight
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
            raise bad("extra_weight", "must be a finite number > 0")
        if v != 1.0 and not self.has_extra_layers():  # not a silent no-op (1: no scaling)
            raise bad("extra_weight", "scales the extra layers' features, and the config reads no extra layer (set "
                                      "extra_layers, e.g. --extra-layers 21, or extra_depths)")
        if self.family_fpr is not None:
            v = self.family_fpr
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
                raise bad("family_fpr", "must be a number in (0, 1)")
            if self.target_fpr is None:
                raise SafetyPatchError("gate config: family_fpr raises a target_fpr threshold; with a fixed threshold "
                                       "it has nothing to raise (set target_fpr, or no raise: gate fit --family-fpr none, "
                                       "train --set gate.family_fpr=null)")
            if self.wrapped_benign == 0 or self.wrapped_harmful == 0:
                raise SafetyPatchError("gate config: family_fpr sets the threshold on out-of-family wrapped prompts, and "
                                       f"the pool has wrapped_benign {self.wrapped_benign}, wrapped_harmful "
                                       f"{self.wrapped_harmful}: both must be > 0 (or no raise: gate fit --family-fpr none, "
                                       "train --set gate.family_fpr=null)")
        return self


FEATURES = ("residual", "final-norm")


def model_layer(model, cfg: GateFitConfig) -> int:
    """The decoder layer ``cfg`` reads on ``model``; SafetyPatchError where the model has no such layer."""
    from .probe import decoder_layers

    n_layers = len(decoder_layers(model))
    layer = cfg.resolved_layer(n_layers)
    if layer >= n_layers:
        raise SafetyPatchError(f"gate_layer {layer}: the model has layers 0-{n_layers - 1}")
    return layer


def model_layers(model, cfg: GateFitConfig) -> tuple[int, ...]:
    """Every decoder layer ``cfg`` reads on ``model``, in feature order: (:func:`model_layer`, *extra_layers).
    SafetyPatchError where the model lacks one or an extra layer repeats the first."""
    from .probe import decoder_layers

    first = model_layer(model, cfg)
    n_layers = len(decoder_layers(model))
    extra = cfg.resolved_extra_layers(n_layers)
    for v in extra:
        if v >= n_layers:
            raise SafetyPatchError(f"gate extra_layers: layer {v} out of range: the model has layers 0-{n_layers - 1}")
        if v == first:
            raise SafetyPatchError(f"gate extra_layers: layer {v} is already the gate's layer")
    if (cfg.extra_layers is None and tuple(cfg.extra_depths) != _DEFAULT_EXTRA_DEPTHS
            and len(extra) < len(cfg.extra_depths)):  # depths asked for, not the default's shallow-model fold
        at = {d: min(int(d * n_layers), n_layers - 1) for d in cfg.extra_depths}
        raise SafetyPatchError(f"gate extra_depths {list(cfg.extra_depths)}: on this {n_layers}-layer model they fall on "
                               f"layers {list(at.values())}, and the gate's own layer is {first}: each extra depth must "
                               "name a layer of its own")
    if not extra and cfg.extra_weight != 1.0:  # not a silent no-op on a shallow model
        raise SafetyPatchError(f"gate config: extra_weight {cfg.extra_weight} scales the extra layers' features, and on "
                               f"this {n_layers}-layer model extra_depths {cfg.extra_depths} fall on layer {first}, the "
                               "gate's own layer: no extra layer is read (set extra_layers)")
    return (first, *extra)


def _norm_of(model, cfg: GateFitConfig) -> dict:
    """``{norm_weight, norm_eps}`` of the base's final RMSNorm for a final-norm gate, else ``{}``:
    ``norm_weight`` is the per-channel scale the norm applies (``export.effective_norm_scale``:
    Gemma's ``1 + weight``). Raises SafetyPatchError for a final norm that is not an RMSNorm."""
    if cfg.features != "final-norm":
        return {}
    from ..serve.export import effective_norm_scale, final_norm

    try:
        scale, eps = effective_norm_scale(final_norm(model))
    except SafetyPatchError as e:
        raise SafetyPatchError(f"features final-norm: {e}") from None
    return {"norm_weight": scale, "norm_eps": eps}
