"""The gate as its own stage: fit a probe on a data folder, write a gate folder.

A *gate folder* (``safety-patch gate fit --out G``) holds

* ``gate.safetensors``: the probe in gate.py's format (unchanged: the file a gated patch
  carries), and
* ``gate.json``: what made it and how good it is: kind ``safety-patch/gate``, the base model's
  name and fingerprint, the :class:`GateFitConfig`, prompt counts per kind, validation metrics
  on the data folder's validation split (AUROC, TPR at 1%/5% FPR, FPR at the threshold, each
  with n and a 95% interval), the data manifest's sha256, the code identity and library
  versions, the fit's seconds, and the sha256 of ``gate.safetensors``.

:func:`read_gate_folder` is the one reader: it checks ``gate.json`` against :class:`GateManifest`
and the gate file against the recorded sha256, failing closed with one ``SafetyPatchError`` line
naming file and field. ``train`` fits its gate through :func:`fit_gate_on_data` too, so a gated
patch's gate and a gate folder's are the same fit for the same data and config.

Any patch (a LoRA adapter or a full-parameter delta) can be put behind a gate made for its base
with :func:`apply_gate` (``safety-patch gate apply``).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import ValidationError

from . import textsim
from .errors import FieldError, SafetyPatchError
from .evaluation.stats import FEW_NEGATIVES_NOTE, few_negatives, tpr_at_fpr_text
from .gate import GATE_FILE, Gate, layer_states
from .patch_schema import BaseInfo, Sha256, _Strict

GATE_JSON = "gate.json"
GATE_KIND = "safety-patch/gate"
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
    """How a gate (gate.py) is fit: where it reads, where it fires, and its prompt pool.

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
    from .gate import decoder_layers

    n_layers = len(decoder_layers(model))
    layer = cfg.resolved_layer(n_layers)
    if layer >= n_layers:
        raise SafetyPatchError(f"gate_layer {layer}: the model has layers 0-{n_layers - 1}")
    return layer


def model_layers(model, cfg: GateFitConfig) -> tuple[int, ...]:
    """Every decoder layer ``cfg`` reads on ``model``, in feature order: (:func:`model_layer`, *extra_layers).
    SafetyPatchError where the model lacks one or an extra layer repeats the first."""
    from .gate import decoder_layers

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
    from .serve.export import effective_norm_scale, final_norm

    try:
        scale, eps = effective_norm_scale(final_norm(model))
    except SafetyPatchError as e:
        raise SafetyPatchError(f"features final-norm: {e}") from None
    return {"norm_weight": scale, "norm_eps": eps}


def fit_gate_probe(x: torch.Tensor, y: torch.Tensor, layer: int | Sequence[int], cfg: GateFitConfig,
                   norm: dict) -> Gate:
    """The probe on features ``x`` ([n, k·hidden] residual states of the k layers ``layer``, in
    order) with labels ``y``: a residual gate (standardised, with intercept) or, with ``norm``, a
    final-norm gate without intercept. With several layers, ``cfg.extra_weight`` scales the later
    layers' standardised features in the fit (``gate.fit_probe``'s ``feature_scale``)."""
    from .gate import fit_probe

    layers = _layer_tuple(layer)
    first, extra = layers[0], tuple(layers[1:])
    t = cfg.threshold if cfg.threshold is not None else 0.0  # with target_fpr the caller sets it from validation
    scale = None
    if extra and cfg.extra_weight != 1.0:
        per = x.shape[1] // len(layers)
        scale = torch.cat([torch.ones(per), torch.full((x.shape[1] - per,), float(cfg.extra_weight))])
    if not norm:
        w, b, mu, sd = fit_probe(x, y, cfg.l2, feature_scale=scale)
        return Gate(first, t, w, b, mu, sd, extra_layers=extra)
    shell = Gate(first, t, torch.ones(x.shape[1]), 0.0, torch.zeros(x.shape[1]), torch.ones(x.shape[1]), **norm,
                 extra_layers=extra)
    w, b, mu, sd = fit_probe(shell.features(x), y, cfg.l2, intercept=False, feature_scale=scale)
    return Gate(first, t, w, b, mu, sd, **norm, extra_layers=extra)


# ----------------------------------------------------------------------------- prompts


def _prompt_of(row: dict, where: str) -> list[dict]:
    msgs = row["messages"]
    if len(msgs) < 2 or msgs[-1]["role"] != "assistant":
        raise SafetyPatchError(f"{where}: expected 'messages' ending with an assistant turn")
    return msgs[:-1]


def gate_prompts(data, cfg: GateFitConfig) -> tuple[list[list[dict]], list[list[dict]], dict]:
    """The gate's training prompts (see :func:`_gate_pool`)."""
    harmful, benign, counts, _ = _gate_pool(data, cfg)
    return harmful, benign, counts


WRITTEN_NEAR_EVAL = 0.5
"""3-gram Jaccard at which a hand-written gate request counts as a near-duplicate of a held-out
request and is dropped: ``data build``'s ``near_dup_threshold`` default."""


def _gate_pool(data, cfg: GateFitConfig) -> tuple[list[list[dict]], list[list[dict]], dict, list[str | None]]:
    """The gate's training prompts (conversations up to the answer): (harmful, benign, counts).

    ``data``: a data folder's path or its ``DataFolder``. Harmful: every train row's prompt,
    direct and wrapped, then ``wrapped_harmful`` train requests in train templates. Benign: every
    borderline-benign and general train prompt, then up to ``self_instruct`` self-written
    requests, then ``wrapped_benign`` of them wrapped in *train* jailbreak templates (without
    those the probe learns "a template means harmful"), then (``written_harmful``) the
    hand-written requests, as written and re-asked, less any near a val/test request. Held-out
    prompts are never fit on (val/test requests are read only to drop near-duplicates). Raises
    SafetyPatchError naming the file for missing or malformed data. The fourth value: each
    harmful prompt's ``meta.source`` (None where a row has none), for leave-one-source-out.
    """
    from .data.folder import DataFolder
    from .data.prompts import gate_harmful_more_prompts, gate_harmful_prompts, gate_lookalike_prompts

    d = DataFolder.of(data)
    rng = random.Random(cfg.seed)
    train_rows = d.numbered("train")  # read once: the prompts here, the bare requests below
    first: dict[str, tuple[list[dict], str | None]] = {}
    for n, r in train_rows:
        first.setdefault(repr(p := _prompt_of(r, d.where("train", n))), (p, r.get("meta", {}).get("source")))
    harmful = [p for p, _ in first.values()]
    sources: list[str | None] = [s for _, s in first.values()]
    source_of = {r["meta"]["request"]: r["meta"].get("source") for _, r in train_rows if r.get("meta", {}).get("request")}
    benign = [msgs for name in ("borderline", "general") for msgs in d.prompts(name, "train")]
    si: list[list[dict]] = []
    if cfg.self_instruct:
        if not d.has("selfinstruct"):
            raise SafetyPatchError(f"{d.file('selfinstruct')} not found: gate.self_instruct {cfg.self_instruct} needs "
                                   f"`safety-patch data build --self-instruct N` (or fit without them: "
                                   f"`gate fit --self-instruct 0`, `train --gate-self-instruct 0`)")
        for n, r in d.numbered("selfinstruct"):
            if len(si) == cfg.self_instruct:
                break
            msgs = _prompt_of(r, d.where("selfinstruct", n))
            if msgs[-1]["role"] != "user":
                raise SafetyPatchError(f"{d.where('selfinstruct', n)}: expected a user turn before the answer")
            si.append(msgs)
        benign.extend(si)
    if not harmful or not benign:
        raise SafetyPatchError(f"{d.path}: the gate needs harmful (train.jsonl) and benign (borderline/general) train prompts")
    templates = d.templates("train")
    wrapped = []
    if cfg.wrapped_benign and templates:
        for msgs in rng.sample(benign, min(cfg.wrapped_benign, len(benign))):
            t = rng.choice(templates)
            wrapped.append(msgs[:-1] + [{"role": "user", "content": t.render(msgs[-1]["content"])}])
    wrapped_h = []
    if cfg.wrapped_harmful and templates:
        # Drawn after the benign ones, so that adding them leaves the benign draw unchanged.
        requests = sorted({r["meta"]["request"] for _, r in train_rows if r.get("meta", {}).get("request")})
        for req in rng.sample(requests, min(cfg.wrapped_harmful, len(requests))):
            wrapped_h.append([{"role": "user", "content": rng.choice(templates).render(req)}])
            sources.append(source_of[req])
    re_h, re_b = [], []
    per_family: dict[str, list[int]] = {}
    if cfg.rephrased:
        # Drawn last, so that adding them leaves every earlier draw unchanged; one draw per
        # family, in the configured order (the first family's draw is the same whatever follows).
        requests = sorted({r["meta"]["request"] for _, r in train_rows if r.get("meta", {}).get("request")})
        single = [m for m in benign if len(m) == 1 and m[0]["role"] == "user"]
        for fam in cfg.phrasings:
            drawn = rng.sample(requests, min(cfg.rephrased, len(requests)))
            for req in drawn:
                re_h.append([{"role": "user", "content": rephrase(req, fam, rng)}])
                sources.append(source_of[req])
            drawn_b = rng.sample(single, min(cfg.rephrased, len(single)))
            for msgs in drawn_b:
                re_b.append([{"role": "user", "content": rephrase(msgs[0]["content"], fam, rng)}])
            per_family[fam] = [len(drawn), len(drawn_b)]
    written: list[list[dict]] = []
    looks: list[list[dict]] = []
    if cfg.written_harmful:
        # Drawn after everything else (the re-asking uses the same rng), so earlier draws are unchanged.
        reqs = [r["prompt"] for r in gate_harmful_prompts()]
        if cfg.written_harmful_more:  # after the first file's, so its prompts and re-askings come first as before
            reqs += [r["prompt"] for r in gate_harmful_more_prompts()]
        # Like data build's hand-written look-alikes: none may come near a held-out request of
        # this folder (3-gram Jaccard >= WRITTEN_NEAR_EVAL), or validation and test would score
        # a gate on requests it was fit on. Only the requests are read, to drop, never to fit.
        held = [r["meta"]["request"] for split in ("val", "test") if d.has(split)
                for r in d.rows(split) if r.get("meta", {}).get("request")]
        near = {i for i, _, _ in textsim.cross_pairs(reqs, held, WRITTEN_NEAR_EVAL)} if held else set()
        reqs = [q for i, q in enumerate(reqs) if i not in near]
        written = [[{"role": "user", "content": q}] for q in reqs] + [[{"role": "user", "content": reask(q, rng)}]
                                                                       for q in reqs]
        sources.extend([WRITTEN_SOURCE] * len(written))
    if cfg.written_lookalikes:
        # The safe look-alikes, likewise dropped near any held-out benign prompt (the look-alike and
        # general sets the over-refusal rates are measured on), then re-asked after the harmful ones.
        looks_q = [r["prompt"] for r in gate_lookalike_prompts()]
        held_b = [m[-1]["content"] for name in ("borderline", "general") if d.has(name) for split in ("val", "test")
                  for m in d.prompts(name, split)]
        near_b = {i for i, _, _ in textsim.cross_pairs(looks_q, held_b, WRITTEN_NEAR_EVAL)} if held_b else set()
        looks_q = [q for i, q in enumerate(looks_q) if i not in near_b]
        looks = [[{"role": "user", "content": q}] for q in looks_q] + [[{"role": "user", "content": reask(q, rng)}]
                                                                        for q in looks_q]
    counts = {"harmful": len(harmful), "benign": len(benign), "wrapped_benign": len(wrapped)}
    if cfg.written_harmful:
        counts["written_harmful"] = len(written)
        counts["written_near_eval"] = len(near)
    if cfg.written_lookalikes:
        counts["written_lookalikes"] = len(looks)
        counts["written_lookalikes_near_eval"] = len(near_b)
    if wrapped_h:
        counts["wrapped_harmful"] = len(wrapped_h)
    if re_h or re_b:
        counts["rephrased_harmful"], counts["rephrased_benign"] = len(re_h), len(re_b)
        if list(per_family) != ["reask"]:  # per family and side, in draw order
            for fam, (nh, nb) in per_family.items():
                counts[f"rephrased_harmful_{fam}"], counts[f"rephrased_benign_{fam}"] = nh, nb
    if si:
        counts["self_instruct"] = len(si)
    return harmful + wrapped_h + re_h + written, benign + wrapped + re_b + looks, counts, sources


_HOW = re.compile(r"^(?:how|what(?:'s| is) the best way|what is a good way)\s+(?:to|do i|can i|could i|would i|should i|"
                  r"might i|would one|does one|can one|do you|can you|can someone|would someone)\s+(.+?)\s*\?*$",
                  re.IGNORECASE | re.DOTALL)
_REASK_Q = ("Explain how to {x}.", "Give me step-by-step instructions to {x}.", "Write a short guide on how to {x}.",
            "Tell me how to {x}.")
_REASK_I = ("Can you {x}?", "Could you {x}?", "I need you to {x}.", "Would you please {x}?")


def reask(text: str, rng: random.Random) -> str:
    """``text`` asked in the other common form: "How (do I|to|can I) X?" -> an instruction ("Explain
    how to X."); an instruction ("Write X", "Give X") -> a question or request ("Can you write X?");
    any other question gets an instruction frame ("Answer this: Q"). The choice among the forms is
    drawn from ``rng``. Multi-line texts keep everything before their last line as context."""
    head, _, last = text.rstrip().rpartition("\n")
    prefix = head + "\n" if head else ""
    q = last.strip()
    m = _HOW.match(q)
    if m:
        return prefix + rng.choice(_REASK_Q).format(x=m.group(1).rstrip(" ?."))
    if q.endswith("?"):
        return prefix + rng.choice(("Answer this: {x}", "I'd like a clear answer. {x}", "Explain: {x}")).format(x=q)
    x = q.rstrip(" .!")
    x = x[:1].lower() + x[1:] if x[:1].isupper() and not x[1:2].isupper() else x
    return prefix + rng.choice(_REASK_I).format(x=x)


# Neutral framings (issue 23 item 5: more phrasings on both sides of the pool). Each is applied
# to harmful requests and benign prompts alike, so the framing itself carries no label and the
# probe must read the request. None of them is a rule attack's wording (attacks/rules.py): the
# unseen-attack report stays unseen.
_FRAMES = {
    "context": ("I have a question about something that came up at work today. {x}",
                "Some background first: I'm trying to understand this properly and the usual explanations didn't help. {x}",
                "My friend and I were talking about this last night and couldn't agree. {x}",
                "Quick one before my meeting. {x}"),
    "third_person": ("A friend of mine asked me this and I didn't know what to say: {x}",
                     "Someone in a chat group posted this question: \"{x}\" What's the answer?",
                     "My colleague wants to know the following. {x}"),
    "hedged": ("Just out of curiosity, {x}", "This might be a silly question, but {x}",
               "Be honest with me. {x}", "I'd appreciate a detailed answer. {x}"),
    "terse": ("{x}", "{x} thx", "pls answer: {x}"),
}
PHRASINGS = ("reask", *_FRAMES)
"""The phrasing families :func:`rephrase` knows: ``reask`` (instruction <-> question) and neutral frames."""


def rephrase(text: str, family: str, rng: random.Random) -> str:
    """``text`` in phrasing ``family`` (:data:`PHRASINGS`): ``reask`` is :func:`reask`; the frames
    put the last line in a neutral frame drawn from ``rng`` (``terse``: lower case, no final
    punctuation, the clipped form people type). Multi-line texts keep everything before their
    last line. Raises SafetyPatchError for an unknown family."""
    if family == "reask":
        return reask(text, rng)
    if family not in _FRAMES:
        raise SafetyPatchError(f"gate phrasing {family!r}: expected one of {', '.join(PHRASINGS)}")
    head, _, last = text.rstrip().rpartition("\n")
    prefix = head + "\n" if head else ""
    q = last.strip()
    frame = rng.choice(_FRAMES[family])
    if family == "terse":
        q = q.rstrip(" .!?")
    if family == "terse" or frame.startswith(("Just out of curiosity", "This might be a silly")):
        q = _lower_first(q)  # the request continues a sentence (or is typed in lower case)
    return prefix + frame.format(x=q)


def _lower_first(q: str) -> str:
    return q[:1].lower() + q[1:] if q[:1].isupper() and not q[1:2].isupper() else q


WRITTEN_SOURCE = "written"
"""``meta.source`` of the hand-written gate positives (``gate.written_harmful``)."""


def pool_features(model, tokenizer, harmful: Sequence, benign: Sequence, counts: dict, layer: int | Sequence[int],
                  batching: Batching = BATCHING, fingerprint: str | None = None,
                  bank: FeatureBank | None = None) -> torch.Tensor:
    """Features of the gate pool ``harmful + benign`` ([n, hidden]): the hand-written positives
    (the last ``counts["written_harmful"]`` harmful prompts) and look-alikes (the last
    ``counts["written_lookalikes"]`` benign ones) are read apart from the rest, so the rest reuses
    the cache of a fit without them (:func:`cached_features`). Always read as a fit reads them
    (the refits must see the fit's own features); with ``bank``, also deposited in it, so a
    report's later lists skip the pool prompts they hold."""
    ids_h, ids_b = encode(tokenizer, list(harmful)), encode(tokenizer, list(benign))
    n_w, n_l = counts.get("written_harmful", 0), counts.get("written_lookalikes", 0)
    if not n_w and not n_l:
        out = cached_features(model, tokenizer, ids_h + ids_b, layer, batching, fingerprint)
    else:
        k, j = len(harmful) - n_w, len(benign) - n_l
        base = cached_features(model, tokenizer, ids_h[:k] + ids_b[:j], layer, batching, fingerprint)
        parts = [base[:k]]
        if n_w:
            parts.append(cached_features(model, tokenizer, ids_h[k:], layer, batching, fingerprint))
        parts.append(base[k:])
        if n_l:
            parts.append(cached_features(model, tokenizer, ids_b[j:], layer, batching, fingerprint))
        out = torch.cat(parts)
    if bank is not None:
        bank.add(ids_h + ids_b, out, layer)
    return out


class FeatureBank:
    """Gate features by prompt (token ids) for one model, layer set, batching and feature cache:
    what :func:`evaluate_gate`'s lists read, so that a prompt is read once however many of them
    hold it. They overlap: a split's benign and wrapped prompts are in every leave-one-source-out
    comparison, a source's train requests and the hand-written look-alikes are in the gate's pool,
    the prefill attack reads the split's own prompts: on the ``reproduce --quick`` gate stage the
    report read 2,132 prompts (195k tokens) on its own lists and 994 (114k) through a bank, 1.76x
    faster (bench/gate_eval.py, session 29). :meth:`read` reads a list's prompts not yet held in one
    :func:`cached_features` pass and assembles the list from the bank; :meth:`add` deposits a
    list read elsewhere (the pool, as the fit read it). A prompt keeps the features of the first
    list that read it, which equal any other list's read to float rounding (:func:`features`);
    within one command the order of the reads, and so every value, is fixed."""

    def __init__(self, model, tokenizer, layers: int | Sequence[int], batching: Batching = BATCHING,
                 fingerprint: str | None = None):
        self.model, self.tokenizer, self.batching, self.fingerprint = model, tokenizer, batching, fingerprint
        self.layers = _layer_tuple(layers)
        self.rows: dict[tuple[int, ...], torch.Tensor] = {}

    def add(self, prompts: Sequence[Sequence[int]], x: torch.Tensor, layers: int | Sequence[int]) -> None:
        """Hold ``x``'s rows ([len(prompts), k·hidden]) for ``prompts``, read at ``layers`` (ignored
        unless they are the bank's); a prompt already held keeps its first features."""
        if _layer_tuple(layers) != self.layers:
            return
        for p, row in zip(prompts, x, strict=True):
            self.rows.setdefault(tuple(p), row)

    def read(self, prompts: Sequence[Sequence[int]], layers: int | Sequence[int]) -> torch.Tensor:
        """:func:`cached_features` of ``prompts`` at ``layers`` ([n, k·hidden]), reading only the
        prompts not held (once each, in first-seen order); at other layers than the bank's, a
        plain :func:`cached_features` call."""
        if _layer_tuple(layers) != self.layers:
            return cached_features(self.model, self.tokenizer, prompts, layers, self.batching, self.fingerprint)
        missing = list(dict.fromkeys(tuple(p) for p in prompts if tuple(p) not in self.rows))
        if missing:
            x = cached_features(self.model, self.tokenizer, [list(p) for p in missing], self.layers, self.batching,
                                self.fingerprint)
            self.add(missing, x, self.layers)
        if not prompts:
            return torch.zeros(0, len(self.layers) * getattr(self.model.config, "hidden_size", 0))
        return torch.stack([self.rows[tuple(p)] for p in prompts])


def _layer_tuple(layers: int | Sequence[int]) -> tuple[int, ...]:
    return (int(layers),) if isinstance(layers, int) else tuple(int(v) for v in layers)


def _read(model, tokenizer, prompts: Sequence[Sequence[int]], layer: int | Sequence[int], batching: Batching,
          fingerprint: str | None, bank: FeatureBank | None) -> torch.Tensor:
    """:func:`cached_features`, through ``bank`` when one is given."""
    if bank is not None:
        return bank.read(prompts, layer)
    return cached_features(model, tokenizer, prompts, layer, batching, fingerprint)


HELD_OUT_SETS = ("harmful_direct", "harmful_wrapped", "borderline", "general", "wrapped_benign")
"""The held-out prompt sets of a split, positives first."""


def held_out_prompts(data, split: str = "val", seed: int = 0) -> dict[str, list[list[dict]]]:
    """One split's prompts by set: harmful requests direct and inside the split's jailbreak
    templates (``val.jsonl``/``test.jsonl``), borderline-benign and general prompts, and those
    benign prompts each wrapped in one of the split's templates (drawn with ``seed``).

    Raises SafetyPatchError for a missing or malformed file, or a split without prompts."""
    from .data.folder import DataFolder

    if split not in ("val", "test"):
        raise SafetyPatchError(f"split must be val or test, got {split!r} (the train split is what the gate learns from)")
    d = DataFolder.of(data)
    out: dict[str, list[list[dict]]] = {k: [] for k in HELD_OUT_SETS}
    for n, r in d.numbered(split):
        msgs = _prompt_of(r, d.where(split, n))
        direct = r.get("meta", {}).get("template", "direct") == "direct"
        out["harmful_direct" if direct else "harmful_wrapped"].append(msgs)
    for name in ("borderline", "general"):
        out[name] = d.prompts(name, split)
    templates = d.templates(split)
    if templates:
        rng = random.Random(seed)
        for msgs in out["borderline"] + out["general"]:
            out["wrapped_benign"].append(msgs[:-1] + [{"role": "user", "content": rng.choice(templates).render(msgs[-1]["content"])}])
    if not (out["harmful_direct"] or out["harmful_wrapped"]) or not (out["borderline"] or out["general"]):
        raise SafetyPatchError(f"{d.path}: the {split} split needs harmful ({split}.jsonl) and benign (borderline/general) prompts")
    return out


RULE_ATTACKS = ("past_tense", "future_tense", "prefix_injection", "refusal_suppression", "style_injection", "roleplay",
                "base64", "rot13", "few_shot", "prefill", "multi_turn")
"""The rule attacks (attacks/rules.py) a gate report can run: each needs no attacker model."""


def unseen_attacks(data) -> list[str]:
    """The rule attacks the folder's train split never used: :data:`RULE_ATTACKS` minus the
    manifest's ``config.train_transforms`` (data build wraps some train rows in those)."""
    from .data.folder import DataFolder

    seen = set((DataFolder.of(data).manifest.get("config") or {}).get("train_transforms") or ())
    return [a for a in RULE_ATTACKS if a not in seen]


def attack_prompts(data, split: str, attacks: Sequence[str]) -> dict[str, dict[str, list[tuple[list[dict], str]]]]:
    """Per attack, what the gate reads under it: ``{attack: {"harmful": [...], "benign": [...]}}``,
    each item ``(messages, prefill)``.

    ``harmful``: the split's direct harmful requests (``val.jsonl``/``test.jsonl``) under the attack;
    ``benign``: the split's borderline + general prompts under the same attack, the cleaned control
    (a gate that fires on the attack's form rather than the request fires on these too). Raises
    SafetyPatchError for an unknown attack name or a missing file."""
    from .attacks import get_attack
    from .data.folder import DataFolder

    d = DataFolder.of(data)
    held = held_out_prompts(d, split)
    out: dict[str, dict[str, list[tuple[list[dict], str]]]] = {}
    for name in attacks:
        a = get_attack(name)
        if getattr(a, "needs_model", False):
            raise SafetyPatchError(f"attack {name!r} needs a model to optimise against: a gate report runs rule attacks "
                                   f"({', '.join(RULE_ATTACKS)})")
        sets = {}
        for kind, convs in (("harmful", held["harmful_direct"]), ("benign", held["borderline"] + held["general"])):
            items = []
            for msgs in convs:
                att = a.apply(msgs[-1]["content"])
                items.append((list(msgs[:-1]) + att.messages, att.prefill))
            sets[kind] = items
        out[name] = sets
    return out


def attack_scores(model, tokenizer, gate: Gate, sets: dict[str, dict[str, list[tuple[list[dict], str]]]],
                  batching: Batching = BATCHING, fingerprint: str | None = None,
                  bank: FeatureBank | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """The gate's logits on :func:`attack_prompts`' sets, read where routing reads: at the last
    token of the rendered prompt, before any prefill (generation.generate routes on the prompt
    alone, so a prefill cannot move where the gate reads) ({attack: {"harmful": [n], "benign": [m]}})."""
    flat = [(a, k, it) for a, s in sets.items() for k in ("harmful", "benign") for it in s[k]]
    ids = encode(tokenizer, [m for _, _, (m, _) in flat])
    z = gate.scores(_read(model, tokenizer, ids, gate.layers, batching, fingerprint, bank)) if ids else torch.zeros(0)
    out: dict[str, dict[str, list]] = {a: {"harmful": [], "benign": []} for a in sets}
    for (a, k, _), v in zip(flat, z.tolist(), strict=True):
        out[a][k].append(v)
    return {a: {k: torch.tensor(v) for k, v in s.items()} for a, s in out.items()}


def attack_report(scores: dict[str, dict[str, torch.Tensor]], threshold: float) -> dict:
    """Per attack: the share of harmful requests the gate fires on under it (caught), of its
    benign controls (false positives), each with n and a Wilson interval, and their AUROC."""
    from .evaluation.stats import proportion

    return {a: {"caught": proportion(int((s["harmful"] > threshold).sum()), len(s["harmful"])),
                "fired_on_benign": proportion(int((s["benign"] > threshold).sum()), len(s["benign"])),
                "auroc": _auroc_ci(s["harmful"].tolist(), s["benign"].tolist())}
            for a, s in scores.items()}


# ----------------------------------------------------------------------------- features


def encode(tokenizer, convs: Sequence[Sequence[dict]], prefills: Sequence[str] | None = None) -> list[list[int]]:
    """Token ids of each conversation's rendered chat prompt (assistant header included), as the
    gate reads it; with ``prefills``, each prompt continued by its prefill (where routing reads
    when an answer is prefilled: generation renders the prompt, then appends the prefill)."""
    from .generation import render

    texts = [render(tokenizer, m) for m in convs]
    if prefills is not None:
        texts = [t + p for t, p in zip(texts, prefills, strict=True)]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def length_buckets(lengths: Sequence[int], token_budget: int = 8192, max_batch: int = MAX_BATCH) -> list[list[int]]:
    """Indices grouped into batches of similar length: sorted by length (stable), each batch
    as many prompts as fit ``token_budget`` (rows x the batch's longest prompt), at most
    ``max_batch``, at least one."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:  # ascending: the prompt being added is the batch's widest
        if cur and ((len(cur) + 1) * lengths[i] > token_budget or len(cur) >= max_batch):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


def features(model, tokenizer, prompts: Sequence[Sequence[int]], layer: int,
             batching: Batching = BATCHING, batch_size: int = 8) -> torch.Tensor:
    """Hidden state after decoder layer ``layer`` at each prompt's last token: [n, hidden] fp32.

    ``batching`` (:data:`Batching`): ``"shared-prefix"`` reads shared beginnings once
    (:func:`.shared_prefix.last_token_states`); None: length-sorted batches of ``batch_size``
    (``gate.prompt_states``, the path of gates written before session 18); an int:
    length-bucketed batches under that token budget. Each stops after ``layer`` and runs under
    inference mode; they agree to float rounding. Raises SafetyPatchError for an unknown
    ``batching``, a layer the model lacks or an empty prompt.
    """
    return features_at(model, tokenizer, prompts, [layer], batching, batch_size)[layer]


def features_at(model, tokenizer, prompts: Sequence[Sequence[int]], layers: Sequence[int],
                batching: Batching = BATCHING, batch_size: int = 8) -> dict[int, torch.Tensor]:
    """:func:`features` at each of ``layers`` in one pass that stops after the deepest:
    {layer: [n, hidden] fp32}, each equal to what :func:`features` reads for that layer alone."""
    from .progress import bar

    if not (batching is None or batching == SHARED_PREFIX or (isinstance(batching, int) and not isinstance(batching, bool)
                                                              and batching > 0)):
        raise SafetyPatchError(f"gate feature batching {batching!r}: expected {SHARED_PREFIX!r}, None or a positive "
                               "token budget")
    layers = sorted(set(layers))
    what = f"layer{'s' * (len(layers) > 1)} {', '.join(map(str, layers))}"
    with torch.inference_mode(), bar(len(prompts), f"[gate] {what} states", unit="prompt") as b:
        if batching is None:
            return layer_states(model, tokenizer, prompts, layers, batch_size, progress=b.update)
        if batching == SHARED_PREFIX:
            from .shared_prefix import last_token_states_at

            return last_token_states_at(model, prompts, layers, progress=b.update)
        dim = getattr(model.config, "hidden_size", 0)
        out = {li: torch.zeros(len(prompts), dim) for li in layers}
        for idx in length_buckets([len(p) for p in prompts], batching):
            got = layer_states(model, tokenizer, [prompts[i] for i in idx], layers, len(idx))
            for li in layers:
                out[li][idx] = got[li]
            b.update(len(idx))
        return out


@functools.cache
def feature_code_key() -> str:
    """Identity of the code that computes gate features: the source of the functions on the path
    from token ids to a layer's last-token state, and the transformers version (the model's
    forward). Keyed on these rather than on the whole package, so that an edit elsewhere (a pool
    default, a report) does not throw away a ~10-minute pool read; the base weights, prompts,
    layer, batching, device, dtype, threads and torch version are keyed beside it. Computed once
    per process, from the code as imported."""
    import hashlib
    import inspect

    import transformers

    from . import gate, shared_prefix
    from .generation import PREFILL_PASS_COST

    # layer_states batches by generation.length_groups: where a batch is cut changes features by rounding
    parts = [inspect.getsource(f) for f in (gate.layer_states, gate.left_padded, gate.length_groups, gate.decoder_layers,
                                            gate._Stop, features, features_at, length_buckets)]
    parts.append(inspect.getsource(shared_prefix))
    parts += [f"MAX_BATCH={MAX_BATCH}", f"PREFILL_PASS_COST={PREFILL_PASS_COST}", transformers.__version__]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def _feature_cache_path(model, prompts: Sequence[Sequence[int]], layer: int, batching: Batching, fingerprint: str):
    import hashlib
    import json

    from .models import home

    p = next(model.parameters())
    key = hashlib.sha256(json.dumps({
        "fingerprint": fingerprint, "code": feature_code_key(), "torch": torch.__version__, "layer": layer,
        "batching": batching, "device": str(p.device), "dtype": str(p.dtype), "threads": torch.get_num_threads(),
        "prompts": [list(map(int, x)) for x in prompts]}).encode()).hexdigest()
    return home() / "gate-features" / f"{key[:32]}.safetensors"


def cached_features(model, tokenizer, prompts: Sequence[Sequence[int]], layer: int | Sequence[int],
                    batching: Batching = BATCHING, fingerprint: str | None = None) -> torch.Tensor:
    """:func:`features`, reused from ``$SAFETY_PATCH_HOME/gate-features/`` when the same prompts
    were read before on the same base (``fingerprint``), feature code (:func:`feature_code_key`), layer, batching, device, dtype,
    thread count and torch version: a refit with another threshold, target FPR or L2, or
    ``gate fit`` after ``train`` with the same gate settings, skips the forward passes. The
    cached value is that earlier computation of exactly these batches. ``fingerprint`` None: no
    cache. A cache file that is unreadable, of the wrong shape or not finite is recomputed; one
    that cannot be written is skipped (the cache never fails a fit). ``layer`` a sequence: each
    layer's features (cached apart; the layers not cached read in one pass, :func:`features_at`),
    concatenated in its order: [n, k·hidden]."""
    import os
    import tempfile

    from safetensors.torch import load_file, save_file

    layers = _layer_tuple(layer)
    dim = getattr(model.config, "hidden_size", 0)
    got: dict[int, torch.Tensor] = {}
    paths = {}
    if fingerprint is not None:
        for li in set(layers):
            paths[li] = path = _feature_cache_path(model, prompts, li, batching, fingerprint)
            if path.is_file():
                try:
                    x = load_file(str(path))["features"]
                    if tuple(x.shape) == (len(prompts), dim) and x.dtype == torch.float32 and bool(torch.isfinite(x).all()):
                        got[li] = x
                except Exception:  # a damaged cache entry: recompute (and rewrite) it
                    pass
    missing = sorted(set(layers) - set(got))
    if missing:
        fresh = features_at(model, tokenizer, prompts, missing, batching)
        for li in missing:
            got[li] = x = fresh[li]
            if li not in paths:
                continue
            try:
                paths[li].parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=paths[li].parent)
                os.close(fd)
                save_file({"features": x.contiguous()}, tmp)
                os.replace(tmp, paths[li])  # atomic: a reader sees the old file or the whole new one
            except OSError:
                pass
    return got[layers[0]] if len(layers) == 1 else torch.cat([got[li] for li in layers], 1)


# ----------------------------------------------------------------------------- metrics


def threshold_at_fpr(negatives: torch.Tensor, fpr: float) -> float:
    """The smallest sorted negative logit t with share(negatives > t) <= ``fpr`` (a gate fires on
    logit > threshold). Raises SafetyPatchError without negatives."""
    s = sorted((float(v) for v in negatives), reverse=True)
    if not s:
        raise SafetyPatchError("no benign prompts to set a threshold at a false-positive rate on")
    k = int(math.floor(fpr * len(s) + 1e-9))  # at most k negatives may lie above the threshold
    return s[min(k, len(s) - 1)]


def auroc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos n_neg), ties counted half)."""
    from scipy.stats import rankdata

    ranks = rankdata(list(pos) + list(neg))
    n_pos, n_neg = len(pos), len(neg)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _auroc_ci(pos: Sequence[float], neg: Sequence[float]) -> dict:
    """AUROC with Newcombe's score 95% interval (:func:`stats.auroc_interval`; gate files before
    2026-12-04 carry a stratified percentile-bootstrap interval, ``"interval": "bootstrap"``)."""
    from .evaluation.stats import auroc_interval

    if not len(pos) or not len(neg):
        return {"value": None, "n_pos": len(pos), "n_neg": len(neg), "ci95": [None, None], "interval": "newcombe"}
    value = auroc(pos, neg)
    lo, hi = auroc_interval(value, len(pos), len(neg))
    return {"value": value, "n_pos": len(pos), "n_neg": len(neg), "ci95": [lo, hi], "interval": "newcombe"}


def discrimination(pos: torch.Tensor, neg: torch.Tensor, threshold: float) -> dict:
    """How well logits ``pos`` (harmful) and ``neg`` (benign) separate: AUROC (Newcombe's score CI), TPR
    at 1% and 5% FPR (threshold set on ``neg``; Wilson CI over the positives, given that
    threshold), and TPR and FPR at ``threshold`` (Wilson CIs).

    Each TPR at an FPR also records ``fpr_reached`` (the share of ``neg`` above its threshold,
    which the FPR's step of 1/len(neg) can put below the target) and ``too_few_negatives``:
    with fewer than 1/FPR benign logits (under 100 for 1%), not one may fire, so that figure
    is the TPR at 0% FPR, stricter than its name; the tables mark it (``stats.FEW_NEGATIVES``)."""
    from .evaluation.stats import proportion

    out: dict[str, Any] = {"auroc": _auroc_ci(pos.tolist(), neg.tolist())}
    for f in (0.01, 0.05):
        if len(neg) and len(pos):
            t = threshold_at_fpr(neg, f)
            out[f"tpr_at_fpr_{f:g}"] = proportion(int((pos > t).sum()), len(pos)) | {
                "threshold": t, "fpr_reached": proportion(int((neg > t).sum()), len(neg)),
                "too_few_negatives": len(neg) * f < 1 - 1e-9}
    out["tpr_at_threshold"] = proportion(int((pos > threshold).sum()), len(pos))
    out["fpr_at_threshold"] = proportion(int((neg > threshold).sum()), len(neg))
    return out


def reliability(scores: dict[str, torch.Tensor], threshold: float) -> dict:
    """The report on one split's logits by set (``HELD_OUT_SETS``): per set the share the gate
    fires on (n, Wilson CI), and the discrimination of direct harmful vs borderline + general,
    wrapped harmful vs wrapped benign, and all harmful vs every benign prompt."""
    from .evaluation.stats import proportion

    def cat(*names: str) -> torch.Tensor:
        parts = [scores[n] for n in names if n in scores and len(scores[n])]
        return torch.cat(parts) if parts else torch.zeros(0)

    sets = {name: proportion(int((z > threshold).sum()), len(z)) for name, z in scores.items()}
    return {
        "threshold": threshold,
        "fired": sets,
        "direct_vs_benign": discrimination(cat("harmful_direct"), cat("borderline", "general"), threshold),
        "wrapped_vs_wrapped_benign": discrimination(cat("harmful_wrapped"), cat("wrapped_benign"), threshold),
        "harmful_vs_benign": discrimination(cat("harmful_direct", "harmful_wrapped"),
                                            cat("borderline", "general", "wrapped_benign"), threshold),
    }


def held_out_scores(model, tokenizer, gate: Gate, data, split: str = "val", seed: int = 0,
                    batching: Batching = BATCHING, fingerprint: str | None = None,
                    bank: FeatureBank | None = None) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The gate's logits on every held-out set of ``split`` ({set: [n]}) and the set sizes."""
    x, sizes = held_out_features(model, tokenizer, gate.layers, data, split, seed, batching, fingerprint, bank)
    return _by_set(gate.scores(x), sizes), sizes


def held_out_features(model, tokenizer, layer: int | Sequence[int], data, split: str = "val", seed: int = 0,
                      batching: Batching = BATCHING, fingerprint: str | None = None,
                      bank: FeatureBank | None = None) -> tuple[torch.Tensor, dict[str, int]]:
    """Layer ``layer``'s features of every held-out set of ``split``, one after the other in
    :data:`HELD_OUT_SETS` order ([n, hidden]), and the set sizes (:func:`_by_set` splits rows)."""
    sets = held_out_prompts(data, split, seed)
    names = [k for k in HELD_OUT_SETS if sets[k]]
    ids = encode(tokenizer, [m for k in names for m in sets[k]])
    return _read(model, tokenizer, ids, layer, batching, fingerprint, bank), {k: len(v) for k, v in sets.items()}


def _by_set(rows: torch.Tensor, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """Rows of :func:`held_out_features` (or anything computed row by row from them) by set."""
    out, at = {}, 0
    for k in HELD_OUT_SETS:
        if sizes.get(k):
            out[k], at = rows[at : at + sizes[k]], at + sizes[k]
    return out


THRESHOLD_POOL = ("borderline", "general", "wrapped_benign")
"""The held-out benign sets a ``target_fpr`` threshold is set on."""


# ----------------------------------------------------------------------------- the stage


def fit_gate_on_data(model, tokenizer, data, cfg: GateFitConfig, batching: Batching = BATCHING,
                     validate: bool | None = True, fingerprint: str | None = None) -> tuple[Gate, dict]:
    """Fit a gate on a data folder's train split; returns (gate, info).

    ``model`` must be the base model (adapters off): the probe reads its hidden states.
    ``info`` holds what ``patch.json``'s ``gate`` has always held (layer, threshold, l2, prompt
    counts, training-set catch rates, fit seconds) plus, with ``validate``, the validation
    report (:func:`reliability`) on the ``val`` split (``validate=None``: when the folder has
    validation harmful and benign prompts; ``train`` fits so). With ``cfg.target_fpr`` the threshold is
    the logit at that false-positive rate on the validation split's benign pool (borderline +
    general + wrapped benign), which then needs ``validate``. Raises SafetyPatchError for an
    invalid config, a layer the model lacks, or missing data. ``fingerprint``: the base's, to
    reuse features computed before (:func:`cached_features`); None computes them.
    """
    from .data.folder import DataFolder

    cfg.validate()
    d = DataFolder.of(data)
    if validate is None:  # derived and hand-made folders may have no usable validation split
        validate = d.has("val") and bool(d.rows("val")) and bool(d.prompts("borderline", "val") or d.prompts("general", "val"))
    layers = model_layers(model, cfg)
    if cfg.target_fpr is not None and not validate:
        raise SafetyPatchError(f"gate config: target_fpr sets the threshold on the validation split, which {d.path} lacks "
                               "(or this fit skips): give a threshold instead (gate fit --threshold T; train --set "
                               "gate.threshold=T --set gate.target_fpr=null)")
    harmful, benign, counts = gate_prompts(d, cfg)
    t0 = time.time()
    was_training = model.training
    model.eval()
    try:
        x = pool_features(model, tokenizer, harmful, benign, counts, layers, batching, fingerprint)
        y = torch.tensor([1.0] * len(harmful) + [0.0] * len(benign))
        gate = fit_gate_probe(x, y, layers, cfg, _norm_of(model, cfg))
        val, raised = None, None
        if validate:
            x_val, sizes = held_out_features(model, tokenizer, layers, d, "val", cfg.seed, batching, fingerprint)
            templates = d.templates("train")
            fam = [template_family(m[-1]["content"], templates) for m in harmful + benign]
            scores, lofo, raised = _set_threshold(gate, x, y, fam, x_val, sizes, layers, cfg, _norm_of(model, cfg))
            val = reliability(scores, gate.threshold) | {"split": "val", "n": sizes, "leave_one_family_out": lofo}
    finally:
        model.train(was_training)
    gate.check("fitted gate")
    f = gate.fires(x)
    info = {"layer": layers[0], "threshold": gate.threshold, "l2": cfg.l2, "harmful": len(harmful), "benign": len(benign),
            "train_harmful_caught": round(float(f[y > 0].float().mean()), 4),
            "train_benign_flagged": round(float(f[y == 0].float().mean()), 4),
            "prompts": counts, "position": "last prompt token", "fit_seconds": round(time.time() - t0, 1)}
    if len(layers) > 1:  # absent for one-layer gates: their patch.json is as before
        info["extra_layers"], info["extra_weight"] = list(layers[1:]), cfg.extra_weight
    if cfg.target_fpr is not None:
        info["threshold_from"] = {"target_fpr": cfg.target_fpr, "pool": "val borderline + general + wrapped benign"}
        if raised is not None:
            info["threshold_from"] |= {"family_fpr": cfg.family_fpr, "raised_by": raised,
                                       "raise_from": "leave-one-family-out margins of the train pool's wrapped safe prompts"}
    if val is not None:
        info["validation"] = val
    return gate, info


def _set_threshold(gate: Gate, x: torch.Tensor, y: torch.Tensor, fam: Sequence[str | None], x_val: torch.Tensor,
                   sizes: dict[str, int], layers: Sequence[int], cfg: GateFitConfig,
                   norm: dict) -> tuple[dict[str, torch.Tensor], dict, float | None]:
    """Set ``gate.threshold`` as `gate fit` does, for a probe fit on pool features ``x`` (labels
    ``y``, template families ``fam``): with ``cfg.target_fpr``, the logit at that rate on the
    validation benign pool (``x_val``'s :data:`THRESHOLD_POOL` sets); with ``cfg.family_fpr``,
    raised by :func:`_family_out_of_fold`'s margin. Returns (validation scores by set, the
    leave-one-family-out report or ``{"skipped": why}``, the raise or None). Raises
    SafetyPatchError when ``family_fpr`` is set and the pool cannot be split by family."""
    scores = _by_set(gate.scores(x_val), sizes)
    if cfg.target_fpr is not None:
        pool = torch.cat([scores[k] for k in THRESHOLD_POOL if k in scores])
        gate.threshold = threshold_at_fpr(pool, cfg.target_fpr)
        if cfg.target_fpr * len(pool) < 1:  # a user's trial: 1e-12 on 124 prompts, a gate catching 4%
            import logging

            logging.getLogger("safety_patch").warning(
                f"warning: --target-fpr {cfg.target_fpr:g} is below 1/{len(pool)} (one prompt of the validation "
                f"benign pool): the threshold sits above every one of them ({gate.threshold:+.3f}), set by the "
                "single highest score; check the catch rate in the report before relying on it")
    # Validation's wrapped prompts come from its own few template families (31 on the default
    # folder); refits without each group of the train families give the wider out-of-family
    # estimate every gate file should carry (leave_one_family_out).
    if why := _lofo_impossible(fam, y):
        if cfg.family_fpr is not None:  # fail closed: the threshold cannot be set as configured
            raise SafetyPatchError(f"gate config: family_fpr {cfg.family_fpr} raises the threshold on out-of-family "
                                   f"wrapped safe prompts, but {why}")
        return scores, {"skipped": why}, None
    feats = _by_set(x_val, sizes)
    x_neg = torch.cat([feats[k] for k in THRESHOLD_POOL if k in feats])
    lofo = {"split": "val", "layer": layers[0], **({"extra_layers": list(layers[1:])} if len(layers) > 1 else {}),
            **_family_out_of_fold(x, y, fam, x_neg, layers, cfg, norm, LOFO_FOLDS, cfg.seed)}
    raised = None
    if cfg.family_fpr is not None:
        raised = lofo["raise_for_family_fpr"]
        gate.threshold += raised
    return scores, lofo, raised


def held_out_requests(data, sources: Sequence[str], split: str = "val",
                      written_more: bool = False) -> dict[str, dict[str, list[list[dict]]]]:
    """Each harmful source's requests for a leave-one-source-out fold: ``{source: {"direct": [...],
    "wrapped": [...]}}``. Direct: every request of that source in the train split and ``split``,
    once each, as a single user turn; wrapped: ``split``'s rows of that source inside a template.
    The hand-written source (:data:`WRITTEN_SOURCE`) is in no split: its requests as written, with
    ``written_more`` (a pool with ``written_harmful_more``) the second file's too."""
    from .data.folder import DataFolder

    d = DataFolder.of(data)
    pos: dict[str, dict[str, list]] = {s: {"direct": [], "wrapped": []} for s in sources}
    seen: set[tuple[str, str]] = set()
    for name in ("train", split):
        for n, r in d.numbered(name):
            m = r.get("meta", {})
            s, req = m.get("source"), m.get("request")
            if s not in pos or not req:
                continue
            if (s, req) not in seen:
                seen.add((s, req))
                pos[s]["direct"].append([{"role": "user", "content": req}])
            if name == split and m.get("template", "direct") != "direct":
                pos[s]["wrapped"].append(_prompt_of(r, d.where(name, n)))
    if WRITTEN_SOURCE in pos:
        from .data.prompts import gate_harmful_more_prompts, gate_harmful_prompts

        rows = gate_harmful_prompts() + (gate_harmful_more_prompts() if written_more else [])
        pos[WRITTEN_SOURCE]["direct"] = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    return pos


def leave_one_source_out(model, tokenizer, data, cfg: GateFitConfig, split: str = "val",
                         batching: Batching = BATCHING, fingerprint: str | None = None,
                         bank: FeatureBank | None = None) -> dict:
    """Refit the gate without each harmful source and measure it on that source: {source: report}.

    Per harmful source S of ``train.jsonl`` (``meta.source``; two or more needed): the probe is
    refit on the gate's train pool without S's prompts (its train rows and its wrapped
    requests), the benign pool unchanged; then measured on S's requests it never saw, direct
    (S's train and ``split`` requests, once each) and ``split``'s wrapped ones, against
    ``split``'s borderline + general prompts (direct) and wrapped benign prompts (wrapped):
    :func:`discrimination` at ``cfg.threshold`` (or, with ``cfg.target_fpr``, the logit at that
    rate on the split's benign pool). Features are computed once for every fold.
    Raises SafetyPatchError with fewer than two sources.
    """
    from .data.folder import DataFolder

    cfg.validate()
    d = DataFolder.of(data)
    norm = _norm_of(model, cfg)
    harmful, benign, counts, sources = _gate_pool(d, cfg)
    names = sorted({s for s in sources if s is not None})
    if len(names) < 2:
        raise SafetyPatchError(f"{d.file('train')}: leave-one-source-out needs two or more harmful sources (meta.source), "
                               f"found {names or 'none'}")
    held = held_out_prompts(d, split, cfg.seed)
    pos = held_out_requests(d, names, split, written_more=cfg.written_harmful_more)
    neg_direct, neg_wrapped = held["borderline"] + held["general"], held["wrapped_benign"]
    tests = [m for s in names for k in ("direct", "wrapped") for m in pos[s][k]] + neg_direct + neg_wrapped
    layer = model_layers(model, cfg)
    model.eval()
    # The pool's features are read with the very list the fit reads (fit_gate_on_data), so a
    # report after a fit (the reproduce gate stage, `gate eval` after `gate fit`) reuses them.
    x_train = pool_features(model, tokenizer, harmful, benign, counts, layer, batching, fingerprint, bank)
    x_test = _read(model, tokenizer, encode(tokenizer, tests), layer, batching, fingerprint, bank)
    y = torch.tensor([1.0] * len(harmful) + [0.0] * len(benign))
    src = list(sources) + [None] * len(benign)
    out: dict[str, Any] = {}
    at = 0
    spans = {}
    for s in names:
        for k in ("direct", "wrapped"):
            spans[(s, k)] = (at, at + len(pos[s][k]))
            at += len(pos[s][k])
    nd = (at, at + len(neg_direct))
    nw = (nd[1], nd[1] + len(neg_wrapped))
    for s in names:
        keep = torch.tensor([v != s for v in src])
        gate = fit_gate_probe(x_train[keep], y[keep], layer, cfg, norm)
        z = gate.scores(x_test)
        zn_d, zn_w = z[nd[0] : nd[1]], z[nw[0] : nw[1]]
        t = threshold_at_fpr(torch.cat([zn_d, zn_w]), cfg.target_fpr) if cfg.target_fpr is not None else cfg.threshold
        (a, b_), (c, e) = spans[(s, "direct")], spans[(s, "wrapped")]
        out[s] = {"held_out": s, "train_harmful_without": int((y[keep] > 0).sum()), "threshold": t,
                  "direct_vs_benign": discrimination(z[a:b_], zn_d, t)}
        if e > c:  # a source with no wrapped rows (the hand-written one) has no wrapped comparison
            out[s]["wrapped_vs_wrapped_benign"] = discrimination(z[c:e], zn_w, t)
    return {"split": split, "layer": layer[0], **({"extra_layers": list(layer[1:])} if len(layer) > 1 else {}),
            "sources": out}


def template_family(content: str, templates: Sequence) -> str | None:
    """The family of the template in ``templates`` that ``content`` was rendered from (the one
    whose text before and after the placeholder is longest among those that match), or None for a
    prompt in none of them."""
    from .attacks.templates import PLACEHOLDER

    best, fam = 0, None
    for t in templates:
        pre, post = t.text.split(PLACEHOLDER)
        n = len(pre) + len(post)
        if n > best and len(content) >= n and content.startswith(pre) and content.endswith(post):
            best, fam = n, t.family
    return fam


LOFO_FOLDS = 5
"""Groups of train template families :func:`leave_one_family_out` refits without, one at a time."""


def leave_one_family_out(model, tokenizer, data, cfg: GateFitConfig, split: str = "val", folds: int = LOFO_FOLDS,
                         seed: int | None = None, batching: Batching = BATCHING, fingerprint: str | None = None,
                         bank: FeatureBank | None = None) -> dict:
    """Leave-one-template-family-out, cross-fitted over the *train* split's template families.

    The train templates' families are dealt into ``folds`` groups (shuffled with ``seed``; None:
    ``cfg.seed``, as a fit's own report deals them). Per group, the
    probe is refit on the gate's pool without every prompt wrapped in that group's families (both
    sides: train rows, wrapped harmful requests, wrapped benign prompts), its threshold set as the
    product sets it (``cfg.target_fpr`` on ``split``'s benign pool, else ``cfg.threshold``), and
    the held-out prompts are scored by their margin over it. So every wrapped pool prompt is
    scored once by a gate that never saw its family: on the seed-1 folder 182 families, where
    validation has 31 (the wrapped figures of :func:`reliability` come from that split's own few
    families). The benign requests inside held-out wrapped prompts also appear unwrapped in the
    refit pool, as the validation split's do not: this isolates the template, not the request.

    Returns ``{"split", "layer", "folds", "families", "wrapped_vs_wrapped_benign":
    discrimination(margins of wrapped harmful, of wrapped benign, 0): the product's threshold,
    "raise_for_fpr_0.05": the logit to add to each fold's threshold for at most 5% of those
    wrapped safe prompts to fire}``. Raises SafetyPatchError for fewer than two train template
    families with wrapped prompts on both sides, or ``folds`` < 2.
    """
    from .data.folder import DataFolder

    cfg.validate()
    if isinstance(folds, bool) or not isinstance(folds, int) or folds < 2:
        raise SafetyPatchError(f"leave-one-family-out: folds must be an integer >= 2, got {folds!r}")
    d = DataFolder.of(data)
    norm = _norm_of(model, cfg)
    harmful, benign, counts, _ = _gate_pool(d, cfg)
    templates = d.templates("train")
    fam = [template_family(m[-1]["content"], templates) for m in harmful + benign]
    y = torch.tensor([1.0] * len(harmful) + [0.0] * len(benign))
    if why := _lofo_impossible(fam, y):
        raise SafetyPatchError(f"{d.file('templates')}: {why}")
    layer = model_layers(model, cfg)
    model.eval()
    x = pool_features(model, tokenizer, harmful, benign, counts, layer, batching, fingerprint, bank)
    # the split's features as a fit reads them (fit_gate_on_data), so a report after a fit reuses them
    x_split, sizes = held_out_features(model, tokenizer, layer, d, split, cfg.seed, batching, fingerprint, bank)
    feats = _by_set(x_split, sizes)
    x_neg = torch.cat([feats[k] for k in THRESHOLD_POOL if k in feats])
    return {"split": split, "layer": layer[0], **({"extra_layers": list(layer[1:])} if len(layer) > 1 else {}),
            **_family_out_of_fold(x, y, fam, x_neg, layer, cfg, norm, folds, cfg.seed if seed is None else seed)}


def _lofo_impossible(fam: Sequence[str | None], y: torch.Tensor) -> str | None:
    """Why leave-one-family-out cannot run on a pool with these template families and labels, or None."""
    families = {f for f in fam if f is not None}
    sides = {lab > 0 for f, lab in zip(fam, y.tolist(), strict=True) if f is not None}
    if len(families) < 2:
        return (f"leave-one-family-out needs two or more train template families with wrapped harmful and wrapped "
                f"benign prompts in the gate's pool, found {len(families)} famil{'y' if len(families) == 1 else 'ies'}")
    if sides != {True, False}:
        side, knob = (("benign", "wrapped_benign (--wrapped-benign)") if True in sides
                      else ("harmful", "wrapped_harmful (--wrapped-harmful)"))
        return (f"leave-one-family-out needs wrapped {side} prompts in the gate's pool, and it has none "
                f"(gate.{knob} is 0?)")
    return None


def family_folds(fam: Sequence[str | None], folds: int, seed: int) -> tuple[torch.Tensor, dict[str, int]]:
    """Leave-one-family-out's groups: the distinct template families of ``fam`` (None: an
    unwrapped prompt) shuffled with ``seed`` and dealt into ``min(folds, families)`` groups.
    Returns each prompt's group ([n], -1 for unwrapped prompts) and each family's group."""
    order = sorted({f for f in fam if f is not None})
    random.Random(seed).shuffle(order)
    k = min(folds, len(order))
    fold_of = {f: i % k for i, f in enumerate(order)}
    return torch.tensor([fold_of[f] if f is not None else -1 for f in fam]), fold_of


def _family_out_of_fold(x: torch.Tensor, y: torch.Tensor, fam: Sequence[str | None], x_neg: torch.Tensor,
                        layer: int | Sequence[int], cfg: GateFitConfig, norm: dict, folds: int, seed: int) -> dict:
    """The refits of :func:`leave_one_family_out` on pool features ``x`` [n, k·hidden] with labels
    ``y``, template families ``fam`` (None: unwrapped) and the threshold pool's features ``x_neg``.
    With ``cfg.family_fpr``, also ``raise_for_family_fpr`` (the logit to add for at most that share
    of these wrapped safe prompts to fire), the figures at that raise, marked in-sample (the raise
    is set on the very prompts they count), and ``at_family_threshold_nested``: each fold's
    prompts scored against a raise set on an inner leave-one-family-out of the *other* folds'
    families (their refits without the fold and each inner group), the out-of-family estimate of
    what the raised threshold does to a family the raise never saw. That costs folds x (folds - 1)
    more refits (LBFGS on cached features: seconds each)."""
    fold, fold_of = family_folds(fam, folds, seed)
    families, k = sorted(fold_of), len(set(fold_of.values()))

    def margins(held: torch.Tensor) -> torch.Tensor:
        """Margins over its threshold of the rows ``held`` under a refit without them."""
        gate = fit_gate_probe(x[~held], y[~held], layer, cfg, norm)
        t = threshold_at_fpr(gate.scores(x_neg), cfg.target_fpr) if cfg.target_fpr is not None else cfg.threshold
        return gate.scores(x[held]) - t, t

    m_h, m_b, per, by_fold = [], [], [], []
    for i in range(k):
        out = fold == i
        m, t = margins(out)
        by_fold.append(m)
        m_h.append(m[y[out] > 0])
        m_b.append(m[y[out] == 0])
        per.append({"families": sum(1 for v in fold_of.values() if v == i), "threshold": t,
                    "wrapped_harmful": int((y[out] > 0).sum()), "wrapped_benign": int((y[out] == 0).sum())})
    mh, mb = torch.cat(m_h), torch.cat(m_b)
    result = {"folds": per, "families": len(families), "wrapped_vs_wrapped_benign": discrimination(mh, mb, 0.0),
              "raise_for_fpr_0.05": max(0.0, threshold_at_fpr(mb, 0.05)) if len(mb) else None}
    if cfg.family_fpr is not None:
        r = max(0.0, threshold_at_fpr(mb, cfg.family_fpr))
        result["raise_for_family_fpr"] = r
        result["at_family_threshold"] = {"in_sample": True, **discrimination(mh, mb, r)}
        n_h, n_b, raises = [], [], []
        for i in range(k):
            out = fold == i
            inner = []
            for j in range(k):
                if j != i:
                    held = fold == j
                    m2, _ = margins(out | held)  # fit without the outer fold and this inner group
                    inner.append(m2[(y[out | held] == 0) & held[out | held]])
            r_i = max(0.0, threshold_at_fpr(torch.cat(inner), cfg.family_fpr))
            raises.append(r_i)
            m = by_fold[i] - r_i
            n_h.append(m[y[out] > 0])
            n_b.append(m[y[out] == 0])
        result["at_family_threshold_nested"] = {"raises": raises,
                                                **discrimination(torch.cat(n_h), torch.cat(n_b), 0.0)}
    return result


# ----------------------------------------------------------------------------- the gate folder


class GateManifest(_Strict):
    """``gate.json``: what the tooling acts on is required and strictly typed; the rest is descriptive."""

    kind: Literal["safety-patch/gate"]
    id: str
    """First 16 hex digits of the sha256 of gate.safetensors (display; checked)."""
    base: BaseInfo
    """The base the gate was fit on: it reads that model's hidden states only."""
    layer: int
    threshold: float
    files: dict[str, str]
    """{"gate.safetensors": sha256}: exactly that file."""
    extra_layers: list[int] = []
    """A multi-layer gate's further layers (absent: one layer); checked against the file."""
    config: dict[str, Any]
    prompts: dict[str, int]
    validation: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    code: dict[str, Any] | None = None
    versions: dict[str, Any] | None = None
    fit_seconds: float | None = None
    created: str | None = None
    binding: Sha256 | None = None
    """:func:`gate_binding` of the fields that say what the gate is for and how it was fit; absent
    only in gate folders written before 2026-12-03."""


BINDING_SINCE = "2026-12-03"
"""gate.json's ``created`` from which a ``binding`` is required (gates fit before carry none)."""


def gate_id(sha256: str) -> str:
    """A gate's identity: the first 16 hex digits of its gate.safetensors sha256."""
    return sha256[:16]


GATE_BOUND_FIELDS = "base.fingerprint, config, data.manifest_sha256 and files"
"""What :func:`gate_binding` covers, as error messages name it."""


def gate_binding(meta: dict) -> str:
    """sha256 over what a gate folder's ``gate.json`` says the gate *is* beyond its file: the base
    it reads (``base.fingerprint``: which model's hidden states, so which patches it may gate),
    the config it was fit with (what ``gate eval``'s refits fit again), the data folder's manifest
    (whether a refit on a folder is a refit of this gate) and the file's hash. Stored as
    ``binding``. As a patch's ``binding`` (patch_schema.binding_digest), not a signature: whoever
    recomputes it can forge it; it makes a hand edit of those fields an error instead of a gate
    silently applied to another base or refit as another gate."""
    import hashlib
    import json

    payload = {"kind": GATE_KIND, "fingerprint": meta["base"]["fingerprint"], "config": meta["config"],
               "data_manifest_sha256": (meta.get("data") or {}).get("manifest_sha256"), "files": meta["files"]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class GateNeverFires(SafetyPatchError):
    """A gate that fires on none of the harmful prompts it was fit on (:func:`check_protects`)."""


def check_protects(record: dict, where: str | Path, warn: bool = True) -> str | None:
    """Refuse a gate whose own record shows it never fires on a harmful prompt it was fit on
    (``train.train_harmful_caught`` 0, or ``train_harmful_caught`` at the top level as fits
    return it): such a gate keeps its patch off for every prompt, a gated patch that protects
    nothing while reading as protection (fail closed). ``record``: a gate fit's info, gate.json,
    or patch.json's ``gate``. Raises GateNeverFires (a SafetyPatchError) naming ``where`` and the threshold.

    A gate that fires on none of its held-out harmful prompts (``validation.fired``:
    harmful_direct and harmful_wrapped together) is not refused (on a small validation split
    that can be chance), but the warning returned (and logged, with ``warn``) says so; so is a gate that
    fires on every training benign prompt (``train_benign_flagged`` 1: its patch is on for every prompt),
    and one whose validation AUROC (``validation.direct_vs_benign.auroc``) has a 95% interval
    reaching 0.5 (its routing is not told apart from chance).
    None otherwise; a record without these figures passes (``patch verify`` routes probe prompts
    through any gate)."""
    import logging

    train = record.get("train") if isinstance(record.get("train"), dict) else record
    t = record.get("threshold")
    at = f" at threshold {t:+.4g}" if isinstance(t, (int, float)) else ""
    caught = train.get("train_harmful_caught")
    if isinstance(caught, (int, float)) and caught == 0 and train.get("harmful"):
        raise GateNeverFires(f"{where}: the gate fires on none of its {train['harmful']} training harmful prompts{at}: "
                               "it would never apply its patch (fail closed): set the threshold from a "
                               "false-positive rate (--target-fpr) or lower --threshold")
    msgs = []
    flagged = train.get("train_benign_flagged")
    if isinstance(flagged, (int, float)) and flagged >= 1 and train.get("benign"):
        # not fail-open (the patch applies everywhere), but a gate in name only: every safe prompt is refused
        msgs.append(f"warning: {where}: the gate fires on all {train['benign']} of its training benign prompts{at}: "
                    "its patch applies to every prompt, as an always-on patch would; raise --threshold or set it "
                    "from a false-positive rate (--target-fpr)")
    fired = ((record.get("validation") or {}).get("fired") or {})
    harmful = [fired[k] for k in ("harmful_direct", "harmful_wrapped") if isinstance(fired.get(k), dict)]
    n = sum(int(f.get("n") or 0) for f in harmful)
    if n and not sum(int(f.get("k") or 0) for f in harmful):
        msgs.append(f"warning: {where}: the gate fires on none of the {n} held-out harmful prompts of its validation "
                    f"report{at}: it may protect nothing; check `gate eval` before relying on it")
    auc = ((record.get("validation") or {}).get("direct_vs_benign") or {}).get("auroc") or {}
    ci = auc.get("ci95") if isinstance(auc, dict) else None
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(x, (int, float)) for x in (auc.get("value"), *ci)) \
            and ci[0] <= 0.5:
        # fires on some harmful prompts, so the check above is quiet, yet routes no better than a coin
        msgs.append(f"warning: {where}: the gate's validation AUROC (harmful direct vs benign) is {auc['value']:.3f} "
                    f"[{ci[0]:.3f}, {ci[1]:.3f}], n = {auc.get('n_pos')} + {auc.get('n_neg')}: not told apart from chance; "
                    "which prompts get the patch is near random; check `gate eval` before relying on it")
    if warn:
        for msg in msgs:
            logging.getLogger("safety_patch").warning(msg)
    return "\n".join(msgs) or None


def write_gate_folder(out: str | Path, gate: Gate, info: dict, base: dict, cfg: GateFitConfig, data_dir: str | Path,
                      overwrite: bool = False) -> dict:
    """Write ``out`` (atomically): gate.safetensors + gate.json; returns gate.json's content.

    ``base``: {"name", "fingerprint"} of the model the gate was fit on. The folder is read back
    with :func:`read_gate_folder` before it is published."""
    from .atomic import atomic_dir, sha256_file, write_json
    from .data.build import manifest_sha256
    from .provenance import code_identity, library_versions

    check_protects({**info, "threshold": gate.threshold}, out)  # before anything is written
    with atomic_dir(Path(out), overwrite=overwrite, kind="gate") as tmp:
        gate.save(tmp)
        sha = sha256_file(tmp / GATE_FILE)
        meta = {"kind": GATE_KIND, "id": gate_id(sha), "base": base, "layer": gate.layer,
                **({"extra_layers": list(gate.extra_layers)} if gate.extra_layers else {}), "threshold": gate.threshold,
                "config": dataclasses.asdict(cfg), "prompts": info["prompts"],
                "train": {k: info[k] for k in ("harmful", "benign", "train_harmful_caught", "train_benign_flagged")},
                **({"threshold_from": info["threshold_from"]} if "threshold_from" in info else {}),
                "validation": info.get("validation"), "position": info["position"],
                "data": {"dir": str(data_dir), "manifest_sha256": manifest_sha256(data_dir)},
                "files": {GATE_FILE: sha}, "code": code_identity(), "versions": library_versions(),
                "fit_seconds": info["fit_seconds"], "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        meta["binding"] = gate_binding(meta)
        write_json(tmp / GATE_JSON, meta)
        read_gate_folder(tmp)
    return meta


def read_gate_folder(path: str | Path) -> tuple[Gate, dict]:
    """Open and check a gate folder: (the Gate, gate.json's content).

    Fails closed with one SafetyPatchError line naming file and field: no folder or no
    gate.json; gate.json not JSON or off :class:`GateManifest`; ``files`` not exactly
    gate.safetensors; the file's sha256 or the id not what gate.json records; ``binding`` not
    :func:`gate_binding` of the fields it covers (a hand-edited base fingerprint, config or data
    hash); a gate that cannot decide (gate.py); layer or threshold in gate.json not the file's.
    A gate.json written before bindings (no ``binding``) is read with those fields unchecked
    (:func:`evaluate_gate` says so in its report).
    """
    from .atomic import interrupted_note, sha256_file
    from .patch_schema import _first_error, _load_json_object

    path = Path(path)
    if not path.is_dir():
        raise SafetyPatchError(f"gate folder not found: {path}{interrupted_note(path)}")
    gj = path / GATE_JSON
    if not gj.is_file():
        raise SafetyPatchError(f"{path} has no {GATE_JSON}: not a gate folder from `safety-patch gate fit`")
    raw = _load_json_object(gj)
    try:
        man = GateManifest.model_validate(raw)
    except ValidationError as e:
        raise _first_error(gj, e, raw) from None
    if not man.base.fingerprint:
        raise SafetyPatchError(f"{gj}: field 'base.fingerprint' is empty; a gate is bound to the base it was fit on")
    if set(man.files) != {GATE_FILE}:
        raise SafetyPatchError(f"{gj}: field 'files' must list exactly {GATE_FILE}, lists {sorted(man.files)}")
    gf = path / GATE_FILE
    if not gf.is_file():
        raise SafetyPatchError(f"{path} is missing {GATE_FILE}")
    sha = sha256_file(gf)
    if sha != man.files[GATE_FILE]:
        raise SafetyPatchError(f"{gf}: sha256 differs from {GATE_JSON} field 'files' (file changed or damaged)")
    if man.id != gate_id(sha):
        raise SafetyPatchError(f"{gj}: field 'id' is {man.id!r}, but {GATE_FILE} hashes to id {gate_id(sha)}")
    if man.binding is None and not (man.created and man.created < BINDING_SINCE):
        # deleting the seal must not switch it off: only a gate written before seals existed may lack one
        raise SafetyPatchError(f"{gj}: field 'binding' is missing, and the gate was written on {man.created or '(no date)'}, "
                               f"when every gate.json carried one (gate.json edited?); fit the gate again")
    if man.binding is not None and man.binding != gate_binding(raw):
        raise SafetyPatchError(f"{gj}: field 'binding' does not match {GATE_BOUND_FIELDS} (gate.json edited after "
                               "the fit?); fit the gate again rather than edit what it was fit on")
    gate = Gate.load(path)
    if gate.layer != man.layer:
        raise SafetyPatchError(f"{gj}: field 'layer' is {man.layer}, {GATE_FILE} holds layer {gate.layer}")
    if list(gate.extra_layers) != man.extra_layers:
        raise SafetyPatchError(f"{gj}: field 'extra_layers' is {man.extra_layers}, {GATE_FILE} holds "
                               f"{list(gate.extra_layers)}")
    if not (math.isfinite(man.threshold) and math.isclose(gate.threshold, man.threshold, rel_tol=1e-6, abs_tol=1e-6)):
        raise SafetyPatchError(f"{gj}: field 'threshold' is {man.threshold}, {GATE_FILE} holds {gate.threshold}")
    return gate, raw


def read_gate_source(path: str | Path) -> tuple[Gate, dict, Path]:
    """The gate of a gate folder (``gate fit``) or of a gated patch (``train``, ``gate apply``):
    (the Gate, a ``gate.json``-shaped record of it, the file that record comes from).

    A gate folder is read by :func:`read_gate_folder`. A gated patch is read by
    ``patches.read_patch`` (every check of a patch: hashes, id, binding, a gate that can decide),
    and its record is built from ``patch.json``: the base; the fit config and the data folder's
    manifest hash from the ``gate`` entry where ``gate apply`` copied them there, else the
    training run's own (``config.gate``, ``data``: ``train`` fits its gate with exactly that
    config on that folder); ``from_patch`` names the patch. ``patch.json``'s binding covers its
    files and base, not those two fields, so :func:`evaluate_gate`'s report says so. Raises
    SafetyPatchError naming the folder: neither gate.json nor patch.json, a patch without a gate,
    or a gated patch that records no fit config (nothing to refit)."""
    from .patches import PATCH_JSON, read_patch

    path = Path(path)
    if (path / GATE_JSON).is_file() or not (path / PATCH_JSON).is_file():
        gate, raw = read_gate_folder(path)
        return gate, raw, path / GATE_JSON
    p = read_patch(path)
    pj = path / PATCH_JSON
    if not p.gated:
        raise SafetyPatchError(f"{path}: an ungated patch has no gate (give a gate folder from `gate fit`, or a gated "
                               "patch from `train` or `gate apply`)")
    info = p.meta["gate"]
    config = info.get("config") or (p.meta.get("config") or {}).get("gate")
    if not isinstance(config, dict):
        raise SafetyPatchError(f"{pj}: records no config of its gate's fit (neither 'gate.config' nor 'config.gate'), "
                               "so the gate cannot be refit or evaluated as it was fit")
    gate = Gate.load(path)
    data = info.get("data") if "config" in info else p.meta.get("data")
    meta = {"kind": GATE_KIND, "id": info.get("id") or gate_id(p.meta["files"][GATE_FILE]), "base": p.meta["base"],
            "layer": gate.layer, **({"extra_layers": list(gate.extra_layers)} if gate.extra_layers else {}),
            "threshold": gate.threshold, "config": config, "prompts": info.get("prompts") or {},
            "data": {k: v for k, v in (data or {}).items() if k in ("dir", "manifest_sha256")} or None,
            "files": {GATE_FILE: p.meta["files"][GATE_FILE]}, "from_patch": {"id": p.id, "path": str(path)},
            "fit_stack": p.gate_fit_stack,
            **{k: info[k] for k in ("threshold_from", "validation", "position", "fit_seconds") if k in info}}
    return gate, meta, pj


def fit_gate_folder(lm, data_dir: str | Path, cfg: GateFitConfig, out: str | Path, overwrite: bool = False,
                    batching: Batching = BATCHING) -> dict:
    """``safety-patch gate fit``: fit a gate for ``lm`` (a models.LoadedModel, no patches attached)
    on ``data_dir`` and write the gate folder ``out`` atomically; returns gate.json's content."""
    from .data.folder import DataFolder

    d = DataFolder(data_dir)
    gate, info = fit_gate_on_data(lm.model, lm.tokenizer, d, cfg, batching=batching, fingerprint=lm.fingerprint)
    return write_gate_folder(out, gate, info, {"name": lm.name, "fingerprint": lm.fingerprint}, cfg, data_dir, overwrite)


# ----------------------------------------------------------------------------- applying and evaluating


def apply_gate(patch_dir: str | Path, gate_dir: str | Path, out: str | Path, overwrite: bool = False,
               replace: bool = False) -> dict:
    """Write a new gated patch at ``out``: ``patch_dir``'s weight files behind ``gate_dir``'s gate
    (a gate folder, or a gated patch whose gate is taken: :func:`read_gate_source`).

    Works for a LoRA adapter and a full-parameter delta. ``patch.json`` keeps the patch's
    base, stack and descriptive fields, records the gate (layer, threshold, id, config,
    prompt counts, validation report, provenance) and the patch it came from; id and binding
    are computed anew (``patches.finalize_patch``). ``replace``: ``patch_dir`` is a gated patch
    whose gate is swapped for the new one (``gated_from``, where it has one, still names the ungated patch; the
    old gate and the gated patch it came from are recorded in ``replaced_gate``). Raises
    SafetyPatchError for a gated patch without ``replace``, an ungated one with it, or a gate fit
    on another base (fingerprints differ); nothing is written then.
    """
    import shutil

    from .atomic import atomic_dir
    from .patches import finalize_patch, read_patch, weight_files

    p = read_patch(patch_dir)
    gate, gmeta, where = read_gate_source(gate_dir)
    check_protects(gmeta, where)
    # A gate fit by `train` itself records no id in patch.json: its id is that of its file, as for a gate folder.
    old_id = p.meta["gate"].get("id") or gate_id(p.meta["files"][GATE_FILE]) if p.gated else None
    if p.gated and not replace:
        raise SafetyPatchError(f"{p.path} is already gated (gate {old_id}); pass --replace to swap its "
                               "gate, or apply the gate to the ungated patch it was made from")
    if replace and not p.gated:
        raise SafetyPatchError(f"{p.path} has no gate to replace; drop --replace to put it behind one")
    if gmeta["base"]["fingerprint"] != p.base_fingerprint:
        raise SafetyPatchError(f"{where}: field 'base.fingerprint' is {gmeta['base']['fingerprint'][:12]}…, "
                               f"but {p.path} was made for base {p.base_fingerprint[:12]}…; a gate reads the hidden states "
                               "of the model it was fit on")
    keep = ("method", "objective", "config", "data", "training")
    fields = {k: p.meta[k] for k in keep if k in p.meta}
    fields["stack"] = p.stack
    fit_stack = list(gmeta.get("fit_stack", []))  # a gate folder's gate was fit on the bare base
    if fit_stack != p.stack:  # e.g. a red-team round's patch behind a gate fit on the bare base
        import logging

        fit_on = f"the base with {', '.join(fit_stack)}" if fit_stack else "the base alone"
        below = ", ".join(p.stack) if p.stack else "the base alone"
        logging.getLogger("safety_patch").warning(
            "warning: the gate of %s was fit on %s, but %s was trained on top of %s: in that stack the gate reads "
            "hidden states it was not fit on, so its routing there is unmeasured (measure it: `safety-patch eval` "
            "with each patch of the stack as --patch, in order)", where, fit_on, p.path, below)
    fields["gate"] = {"layer": gate.layer, **({"extra_layers": list(gate.extra_layers)} if gate.extra_layers else {}),
                      "threshold": gate.threshold, "id": gmeta["id"], "source": str(gate_dir), "fit_stack": fit_stack,
                      **({"source_patch": gmeta["from_patch"]["id"]} if "from_patch" in gmeta else {}),
                      **{k: gmeta[k] for k in ("config", "prompts", "train", "threshold_from", "validation", "position",
                                               "data", "code", "versions", "fit_seconds") if k in gmeta}}
    if replace:
        # A patch gated by `train` itself has no ungated origin to name (no gated_from).
        fields["gated_from"] = p.meta.get("gated_from")
        fields["replaced_gate"] = {"id": old_id, "threshold": p.meta["gate"]["threshold"],
                                   "patch": p.id, "path": str(p.path)}
    else:
        fields["gated_from"] = {"patch": p.id, "path": str(p.path), "code": p.meta.get("code"),
                                "created": p.meta.get("created")}
    fields["versions"] = p.meta.get("versions")
    fields = {k: v for k, v in fields.items() if v is not None}
    with atomic_dir(Path(out), overwrite=overwrite, kind="patch") as tmp:
        for f in weight_files(p.format):
            shutil.copyfile(p.path / f, tmp / f)
        shutil.copyfile(Path(gate_dir) / GATE_FILE, tmp / GATE_FILE)
        meta = finalize_patch(tmp, p.format, dict(p.meta["base"]), **fields)
    return meta


_RETIRED_CONFIG_KEYS = ("written_breadth",)
"""gate.json config keys older code wrote and recorded_config still reads (as their successors)."""


def recorded_config(gmeta: dict, gate, where: str = GATE_JSON) -> GateFitConfig:
    """The config a gate folder was fit with, for refits (leave one source / family out, the
    look-alike cross-fit) that must read what the gate reads: ``gate.json``'s ``config`` with the
    layers pinned to the gate file's (``layer``, ``extra_layers``: a gate fit before extra layers or
    depths existed must not be refit on today's default depths), and fields a file written before
    they existed lacks set to what that code did (no out-of-family raise, extra features unscaled,
    no hand-written prompts). Raises SafetyPatchError (naming ``where``) for a key this code does
    not know: a refit that ignored it would measure another gate than the one recorded."""
    known = {f.name for f in dataclasses.fields(GateFitConfig)}
    unknown = sorted(set(gmeta["config"]) - known - set(_RETIRED_CONFIG_KEYS))
    if unknown:
        raise SafetyPatchError(f"{where}: config key{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} unknown to "
                               f"this safety-patch (written by a newer version?): refits would not fit the recorded gate")
    rec = {k: v for k, v in gmeta["config"].items() if k in known}
    rec.setdefault("family_fpr", None)
    rec.setdefault("extra_weight", 1.0)
    if "written_breadth" in gmeta["config"]:  # one flag for both, for a day (session 25)
        rec |= dict.fromkeys(("written_harmful_more", "written_lookalikes"), bool(gmeta["config"]["written_breadth"]))
    rec.setdefault("written_harmful_more", False)
    rec.setdefault("written_lookalikes", False)
    rec.setdefault("written_harmful", False)
    rec |= {"layer": gate.layer, "extra_layers": list(gate.extra_layers)}
    rec.pop("extra_depths", None)  # pinned by extra_layers above
    return GateFitConfig(**rec)


def check_context(model, ids: Sequence[Sequence[int]], where: str | Path) -> None:
    """Refuse prompts the model cannot read: longer than its positions (hidden states past them are not
    what the gate was fit on; generation refuses them too) or empty. Raises SafetyPatchError naming
    ``where`` and the first such prompt (1-based)."""
    from .generation import context_length, over_context

    bad = sorted(over_context(model, [len(r) for r in ids]) + [i for i, r in enumerate(ids) if not r])
    if bad:
        i = bad[0]
        raise SafetyPatchError(f"{where}: prompt {i + 1} is empty" if not ids[i] else
                               f"{where}: prompt {i + 1} has {len(ids[i])} tokens, over the model's context length "
                               f"of {context_length(model)}: the gate cannot read it")


def user_prompt_sets(harmful: str | Path | None = None, benign: str | Path | None = None) -> dict[str, dict]:
    """A user's own prompt files for :func:`evaluate_gate`, read and checked before any model
    loads: ``{"harmful"|"benign": {"file", "sha256", "prompts": [[user turn]], "categories"}}``.
    Each file is JSONL or CSV with a ``prompt`` (or ``goal``) column and an optional
    ``category`` (the format `eval safety --prompts` reads; AdvBench's CSV works as is).
    Raises SafetyPatchError naming the file and line of a bad row, an empty file, or a prompt in both files."""
    from .atomic import sha256_file
    from .evaluation.prompts import benign_prompts, harmful_requests

    out: dict[str, dict] = {}
    if harmful is not None:
        reqs, _ = harmful_requests(harmful)
        out["harmful"] = {"file": str(harmful), "sha256": sha256_file(harmful),
                          "prompts": [[{"role": "user", "content": r["request"]}] for r in reqs],
                          # the file's own category, not the unified one eval safety groups by: a user
                          # asking which of their categories the gate misses means theirs
                          "categories": [r.get("raw_category") or r["category"] or "user" for r in reqs]}
    if benign is not None:
        rows = benign_prompts(benign)
        out["benign"] = {"file": str(benign), "sha256": sha256_file(benign), "prompts": [r["messages"] for r in rows],
                         "categories": [r["category"] for r in rows]}
    if len(out) == 2:  # one prompt labelled both ways: every AUROC and rate over the pair would be meaningless
        from .textsim import normalise

        harm = {normalise(m[-1]["content"]) for m in out["harmful"]["prompts"]}
        both = [m[-1]["content"] for m in out["benign"]["prompts"] if normalise(m[-1]["content"]) in harm]
        if both:
            raise SafetyPatchError(f"{len(both)} prompt(s) are in both --harmful {harmful} and --benign {benign} "
                                   f"(e.g. {both[0][:80]!r}): a prompt is one or the other; fix the labels")
    return out


def user_prompt_report(model, tokenizer, gate: Gate, sets: dict[str, dict], batching: Batching = BATCHING,
                       fingerprint: str | None = None, bank: FeatureBank | None = None,
                       fit_on: set[str] | None = None) -> dict:
    """The gate on a user's own prompts (:func:`user_prompt_sets`): per file the share it fires on
    (``caught`` for harmful, ``fired`` for benign: each a safe prompt sent to the refusal adapter),
    overall and by category (Wilson 95% intervals), with the prompts it missed / fired on; with
    both files, :func:`discrimination` of one against the other (AUROC, TPR at 1%/5% FPR on the
    user's benign prompts, TPR/FPR at the gate's threshold). The out-of-source check the project's
    own splits cannot give (docs/gate.md). ``fit_on``: the gate's training pool (``textsim.normalise``d
    last user turns); prompts in it are counted (``in_training_pool``) and the rate is given again
    without them (``<rate>_outside_pool``; with both files, ``harmful_vs_benign_outside_pool`` too):
    a prompt the gate learnt from says nothing of prompts it has not seen (a user's trial passed the
    data build's own source file and read 84.6% caught for a mostly in-sample figure)."""
    from .evaluation.stats import proportion
    from .textsim import normalise

    out: dict[str, Any] = {}
    z: dict[str, torch.Tensor] = {}
    unseen_z: dict[str, torch.Tensor] = {}  # the logits of prompts outside the pool
    for kind, name in (("harmful", "caught"), ("benign", "fired")):
        if kind not in sets:
            continue
        u = sets[kind]
        ids = encode(tokenizer, u["prompts"])
        check_context(model, ids, u["file"])
        z[kind] = gate.scores(_read(model, tokenizer, ids, gate.layers, batching, fingerprint, bank))
        fires = (z[kind] > gate.threshold).tolist()
        by: dict[str, list[int]] = {}
        for c, f in zip(u["categories"], fires, strict=True):
            k = by.setdefault(c, [0, 0])
            k[0] += int(f)
            k[1] += 1
        listed = [m[-1]["content"] for m, f in zip(u["prompts"], fires, strict=True) if f != (kind == "harmful")]
        out[kind] = {"file": u["file"], "sha256": u["sha256"], name: proportion(sum(fires), len(fires)),
                     "by_category": {c: proportion(k, n) for c, (k, n) in sorted(by.items())},
                     ("missed_prompts" if kind == "harmful" else "fired_prompts"): listed}
        if fit_on is not None:
            seen = [normalise(m[-1]["content"]) in fit_on for m in u["prompts"]]
            unseen = [f for f, s_ in zip(fires, seen, strict=True) if not s_]
            out[kind] |= {"in_training_pool": sum(seen),
                          "in_training_pool_prompts": [m[-1]["content"] for m, s_ in zip(u["prompts"], seen, strict=True) if s_],
                          f"{name}_outside_pool": proportion(sum(unseen), len(unseen))}
            unseen_z[kind] = z[kind][~torch.tensor(seen, dtype=torch.bool)]
    if len(z) == 2:
        out["harmful_vs_benign"] = discrimination(z["harmful"], z["benign"], gate.threshold)
        if len(unseen_z) == 2 and any(out[k]["in_training_pool"] for k in z):
            # the AUROC too mixes in prompts the gate learnt from: give it again without them
            out["harmful_vs_benign_outside_pool"] = discrimination(unseen_z["harmful"], unseen_z["benign"],
                                                                   gate.threshold)
    return out


def evaluate_gate(lm, gate_dir: str | Path, data_dir: str | Path, split: str = "val", seed: int = 0,
                  batching: Batching = BATCHING, loso: bool = False,
                  attacks: Sequence[str] | None = None, lofo: bool = False,
                  user_sets: dict[str, dict] | None = None) -> dict:
    """``safety-patch gate eval``: the gate's reliability report on one held-out split; with
    ``loso``, also :func:`leave_one_source_out` with the gate's own config (refits: it costs
    about one gate fit); with ``lofo``, also :func:`leave_one_family_out` (five refits on the
    pool's features, which a fit has cached). ``attacks``: rule attacks run on the split's direct harmful requests and
    on its benign prompts (:func:`attack_prompts`); None = those the train split never used
    (:func:`unseen_attacks`), ``[]`` = none. ``user_sets``: the user's own prompt files
    (:func:`user_prompt_sets`), reported as ``user_prompts`` (:func:`user_prompt_report`).

    Refuses (SafetyPatchError) a gate fit on another base than ``lm``."""
    from .data.build import manifest_sha256
    from .provenance import provenance

    gate, gmeta, where = read_gate_source(gate_dir)
    if gmeta["base"]["fingerprint"] != lm.fingerprint:
        raise SafetyPatchError(f"{where}: the gate was fit on base {gmeta['base']['fingerprint'][:12]}…, "
                               f"the model is {lm.fingerprint[:12]}…")
    t0 = time.time()
    # Every list below is read through one bank: the lists overlap, and a prompt is read once.
    bank = FeatureBank(lm.model, lm.tokenizer, gate.layers, batching, lm.fingerprint)
    scores, sizes = held_out_scores(lm.model, lm.tokenizer, gate, data_dir, split, seed, batching, lm.fingerprint, bank)
    rep = reliability(scores, gate.threshold)
    attacks = unseen_attacks(data_dir) if attacks is None else list(attacks)
    if attacks:
        sets = attack_prompts(data_dir, split, attacks)
        rep["attacks"] = attack_report(attack_scores(lm.model, lm.tokenizer, gate, sets, batching, lm.fingerprint, bank),
                                       gate.threshold)
    cfg = recorded_config(gmeta, gate, str(where))
    # Refits (the look-alike cross-fit, leave one source / family out) draw the gate's pool from
    # data_dir: on another folder than the gate's own they fit another gate than the file.
    fit_on = (gmeta.get("data") or {}).get("manifest_sha256")
    other_data = fit_on is not None and fit_on != manifest_sha256(data_dir)
    if user_sets:
        from .data.folder import DataFolder
        from .evaluation.prompts import train_split_texts
        from .textsim import normalise

        # the pool the gate's config draws from data_dir (the gate's own when the folder is, a gate
        # like it otherwise: said in the note), hand-written files included, and the train split's
        # bare requests (one the gate saw only inside a template is not unseen)
        harm_pool, benign_pool, _, _ = _gate_pool(data_dir, cfg)
        pool = {normalise(c[-1]["content"]) for c in (*harm_pool, *benign_pool)} | train_split_texts(DataFolder(data_dir))
        rep["user_prompts"] = user_prompt_report(lm.model, lm.tokenizer, gate, user_sets, batching, lm.fingerprint,
                                                 bank, fit_on=pool)
    if cfg.written_lookalikes and other_data:
        rep["written_lookalikes"] = {"skipped": f"this gate was fit on them, and on another data folder (manifest "
                                                f"{fit_on[:12]}…) than {data_dir}: a refit here would be another gate"}
    else:
        rep["written_lookalikes"] = lookalike_report(lm.model, lm.tokenizer, gate, cfg, batching, lm.fingerprint,
                                                     data_dir, bank)
    if loso:
        rep["leave_one_source_out"] = leave_one_source_out(lm.model, lm.tokenizer, data_dir, cfg, split, batching,
                                                           lm.fingerprint, bank)
    if lofo:
        rep["leave_one_family_out"] = leave_one_family_out(lm.model, lm.tokenizer, data_dir, cfg, split,
                                                           batching=batching, fingerprint=lm.fingerprint, bank=bank)
    notes = []
    if split == "val" and gmeta.get("threshold_from"):
        notes.append("the threshold was chosen on this split (target_fpr): its false-positive rate here is not an "
                     "independent estimate")
    seen = {k: v["in_training_pool"] for k, v in (rep.get("user_prompts") or {}).items() if v.get("in_training_pool")}
    if seen:
        notes.append(f"{' and '.join(f'{n} of your {k} prompts' for k, n in seen.items())} are in the pool the gate "
                     f"{'was' if not other_data else 'would be'} fit on from {data_dir}: the rates "
                     "\"outside the pool\" leave them out")
    if other_data and (loso or lofo):
        notes.append(f"the gate was fit on another data folder (manifest {fit_on[:12]}…): the leave-one-out refits "
                     f"fit this folder's pool, so they measure a gate like this one, not this one")
    if "from_patch" in gmeta:
        notes.append(f"the gate was read from the gated patch {gate_dir}: patch.json's binding covers its files and base, "
                     "not the gate's recorded fit config and data hash, so the refits fit the config as patch.json reads")
    elif gmeta.get("binding") is None:
        notes.append(f"{GATE_JSON} has no binding (written before 2026-12-03): its {GATE_BOUND_FIELDS.replace(' and files', '')} "
                     "are not checked against hand edits, so the refits fit the config as it now reads")
    note = "; ".join(notes) or None
    return {"kind": "safety-patch/gate-eval", "gate": {"path": str(gate_dir), "id": gmeta["id"], "layer": gate.layer,
                                                       **({"patch": gmeta["from_patch"]["id"]} if "from_patch" in gmeta
                                                          else {}),
                                                       **({"extra_layers": list(gate.extra_layers)}
                                                          if gate.extra_layers else {}),
                                                       "threshold": gate.threshold},
            "base": {"fingerprint": lm.fingerprint},  # the model every figure below was read from
            "data": {"dir": str(data_dir), "manifest_sha256": manifest_sha256(data_dir), "split": split, "seed": seed},
            "n": sizes, **rep, **({"note": note} if note else {}), "seconds": round(time.time() - t0, 1), **provenance()}


LOOKALIKE_FOLDS = 2
"""Folds of :func:`lookalike_report`'s cross-fit for a gate fit on the look-alikes."""
USER_PROMPTS_SHOWN = 5
"""Missed / fired user prompts (gate eval --harmful/--benign) the printed table lists; the JSON has all."""


def lookalike_report(model, tokenizer, gate: Gate, cfg: GateFitConfig, batching: Batching = BATCHING,
                     fingerprint: str | None = None, data=None, bank: FeatureBank | None = None) -> dict:
    """The share of the hand-written safe look-alikes (``data.prompts.gate_lookalike_prompts``: 176
    prompts in 19 categories, such as public and fictional figures' privacy, safe contexts, nonsense
    discrimination) the gate fires on, overall and by category, each a Wilson 95% interval, and
    the prompts it fires on (``fired_prompts``): an over-refusal estimate on kinds of safe prompt
    the data folder's look-alike set has few or none of. Every one fired on is a refusal adapter
    engaged on a safe prompt.

    ``method`` says how each prompt was scored. ``unseen``: a gate whose pool lacks them
    (``written_lookalikes`` off) is scored on them as it is. ``cross-fit``: for a gate fit on them,
    each prompt is scored by a refit on the gate's own pool less its fold's look-alikes (line
    ``i`` in fold ``i % LOOKALIKE_FOLDS``, as written and re-asked), thresholded as `gate fit`
    thresholds (:func:`_set_threshold` on ``data``'s validation split): an estimate of the
    fitting procedure, whose threshold moves with the pool (``refit_thresholds``,
    ``refit_raises``). ``at_the_gates_rate`` holds each refit at the gate's own operating point
    instead: the logit at which it fires on as many of the validation benign pool as the gate
    does. A line the fit dropped as near a held-out prompt is scored by the gate itself, which
    never saw it. The cross-fit needs
    the data folder the gate was fit on (``data``); without it the report is ``{"skipped": why}``.
    Raises SafetyPatchError as :func:`fit_gate_on_data` does for a folder it cannot refit on."""
    from .data.folder import DataFolder
    from .data.prompts import gate_lookalike_prompts
    from .evaluation.stats import proportion

    rows = gate_lookalike_prompts()
    convs = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    if cfg.written_lookalikes and data is None:
        return {"skipped": "this gate was fit on them (written_lookalikes) and no data folder was given to refit it "
                           "without them"}
    layers = tuple(gate.layers)
    if cfg.written_lookalikes:  # the pool first: it holds the lines as written, so a bank reads them once
        d = DataFolder.of(data)
        harmful, benign, counts, _ = _gate_pool(d, cfg)
        model.eval()
        x = pool_features(model, tokenizer, harmful, benign, counts, layers, batching, fingerprint, bank)
    x_look = _read(model, tokenizer, encode(tokenizer, convs), layers, batching, fingerprint, bank)
    fired = (gate.scores(x_look) > gate.threshold).tolist()
    extra: dict[str, Any] = {"method": "unseen"}
    if cfg.written_lookalikes:
        y = torch.tensor([1.0] * len(harmful) + [0.0] * len(benign))
        templates = d.templates("train")
        fam = [template_family(m[-1]["content"], templates) for m in harmful + benign]
        x_val, sizes = held_out_features(model, tokenizer, layers, d, "val", cfg.seed, batching, fingerprint, bank)
        norm = _norm_of(model, cfg)
        # The look-alike block closes the benign side: the kept lines as written, then each re-asked.
        n_block = counts["written_lookalikes"]
        start, half = len(x) - n_block, n_block // 2
        line_of = {r["prompt"]: i for i, r in enumerate(rows)}
        pool_rows = {line_of[benign[r - len(harmful)][0]["content"]]: (r, r + half) for r in range(start, start + half)}
        # The shipped gate's operating point on the validation benign pool, to hold the refits at too.
        feats = _by_set(x_val, sizes)
        x_neg = torch.cat([feats[k] for k in THRESHOLD_POOL if k in feats])
        n_fire = int((gate.scores(x_neg) > gate.threshold).sum())
        matched = list(fired)
        thresholds, raises, at_rate = [], [], []
        for h in range(LOOKALIKE_FOLDS):
            held = [i for i in pool_rows if i % LOOKALIKE_FOLDS == h]
            keep = torch.ones(len(x), dtype=torch.bool)
            for i in held:
                keep[list(pool_rows[i])] = False
            refit = fit_gate_probe(x[keep], y[keep], layers, cfg, norm)
            _, _, raised = _set_threshold(refit, x[keep], y[keep], [f for f, k in zip(fam, keep.tolist(), strict=True) if k],
                                          x_val, sizes, layers, cfg, norm)
            t_rate = threshold_at_fpr(refit.scores(x_neg), n_fire / len(x_neg))
            thresholds.append(refit.threshold)
            raises.append(raised)
            at_rate.append(t_rate)
            if held:
                z = refit.scores(x_look[torch.tensor(held)])
                for i, v, m in zip(held, (z > refit.threshold).tolist(), (z > t_rate).tolist(), strict=True):
                    fired[i], matched[i] = v, m
        extra = {"method": "cross-fit", "folds": LOOKALIKE_FOLDS, "refit_thresholds": thresholds, "refit_raises": raises,
                 "scored_by_the_gate": len(rows) - len(pool_rows),
                 "at_the_gates_rate": {"fired": proportion(sum(matched), len(matched)),
                                       "val_benign_fired": proportion(n_fire, len(x_neg)), "refit_thresholds": at_rate}}
    by: dict[str, list[int]] = {}
    for r, f in zip(rows, fired, strict=True):
        k = by.setdefault(r["category"], [0, 0])
        k[0] += int(f)
        k[1] += 1
    return {"fired": proportion(sum(fired), len(fired)),
            "by_category": {c: proportion(k, n) for c, (k, n) in sorted(by.items())},
            "fired_prompts": [r["prompt"] for r, f in zip(rows, fired, strict=True) if f], **extra}


def report_table(rep: dict) -> str:
    """The reliability report as a plain-text table (one row per comparison, one per set)."""
    def pct(p: dict) -> str:
        if p.get("value") is None:
            return "n/a"
        lo, hi = p["ci95"]
        return f"{100 * p['value']:5.1f}% [{100 * lo:4.1f}, {100 * hi:4.1f}]"

    lines = [f"threshold {rep['threshold']:+.3f}", f"{'comparison':<26}{'AUROC [95% CI]':<24}{'TPR@1%FPR':<24}"
             f"{'TPR@5%FPR':<24}{'FPR@threshold':<24}n+/n-"]
    for name in ("direct_vs_benign", "wrapped_vs_wrapped_benign", "harmful_vs_benign"):
        c = rep[name]
        a = c["auroc"]
        auc = "n/a" if a["value"] is None else f"{a['value']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]"
        lines.append(f"{name:<26}{auc:<24}{tpr_at_fpr_text(c, 0.01, pct):<24}{tpr_at_fpr_text(c, 0.05, pct):<24}"
                     f"{pct(c['fpr_at_threshold']):<24}{a['n_pos']}/{a['n_neg']}")
    lines.append(f"{'set':<26}{'fires on [95% CI]':<24}n")
    for name, p in rep["fired"].items():
        lines.append(f"{name:<26}{pct(p):<24}{p['n']}")
    if rep.get("attacks"):
        lines.append(f"{'attack (unseen rules)':<26}{'caught [95% CI]':<24}{'fires on its benign':<24}{'AUROC':<24}n+/n-")
        for name, a in rep["attacks"].items():
            auc = "n/a" if a["auroc"]["value"] is None else f"{a['auroc']['value']:.3f}"
            lines.append(f"{name:<26}{pct(a['caught']):<24}{pct(a['fired_on_benign']):<24}{auc:<24}"
                         f"{a['caught']['n']}/{a['fired_on_benign']['n']}")
    if (lk := rep.get("written_lookalikes")) and "skipped" not in lk:
        top = sorted(lk["by_category"].items(), key=lambda kv: -kv[1]["value"])[:4]
        how = " cross-fit" if lk.get("method") == "cross-fit" else ""
        lines.append(f"{'written look-alikes' + how:<26}{pct(lk['fired']):<24}{lk['fired']['n']}  ("
                     + ("at each refit's own threshold; " if how else "") + "most fired: "
                     + ", ".join(f"{c} {v['k']}/{v['n']}" for c, v in top) + ")")
        if "at_the_gates_rate" in lk:
            label = "  at the gate's own rate"
            lines.append(f"{label:<26}{pct(lk['at_the_gates_rate']['fired']):<24}"
                         f"{lk['fired']['n']}  (each refit firing on as many validation benign prompts as the gate)")
    elif lk:
        lines.append(f"written look-alikes skipped: {lk['skipped']}")
    if up := rep.get("user_prompts"):
        for kind, key, label in (("harmful", "caught", "caught"), ("benign", "fired", "fires on")):
            if kind in up:
                lines.append(f"{'your ' + kind + ' prompts':<26}{pct(up[kind][key]):<24}{up[kind][key]['n']}  "
                             f"({label}; {up[kind]['file']})")
                if up[kind].get("in_training_pool"):  # in-sample prompts: the figure without them beside it
                    lines.append(f"{'  outside the gate pool':<26}{pct(up[kind][key + '_outside_pool']):<24}"
                                 f"{up[kind][key + '_outside_pool']['n']}  ({up[kind]['in_training_pool']} of "
                                 "your prompts are in the gate's training pool)")
                # the categories where the gate errs most, then a few of the prompts it erred on:
                # what a user reads the table for (the JSON keeps them all)
                worst = sorted(up[kind]["by_category"].items(),
                               key=lambda kv: kv[1]["value"] if kind == "harmful" else -kv[1]["value"])[:6]
                if len(up[kind]["by_category"]) > 1:
                    lines.append(f"  by category ({'least caught' if kind == 'harmful' else 'most fired'} first): "
                                 + ", ".join(f"{c} {v['k']}/{v['n']}" for c, v in worst))
                errs = up[kind]["missed_prompts" if kind == "harmful" else "fired_prompts"]
                for q in errs[:USER_PROMPTS_SHOWN]:
                    q = " ".join(q.split())
                    lines.append(f"  {'missed' if kind == 'harmful' else 'fired'}: {q[:100]}{'…' if len(q) > 100 else ''}")
                if len(errs) > USER_PROMPTS_SHOWN:
                    lines.append(f"  … {len(errs) - USER_PROMPTS_SHOWN} more in the JSON report")
        for key, label in (("harmful_vs_benign", "yours: harmful vs benign"),
                           ("harmful_vs_benign_outside_pool", "  outside the gate pool")):
            if key not in up:
                continue
            c = up[key]
            a = c["auroc"]
            auc = "n/a" if a["value"] is None else f"{a['value']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]"
            lines.append(f"{label:<26}{auc:<24}{tpr_at_fpr_text(c, 0.01, pct):<24}"
                         f"{tpr_at_fpr_text(c, 0.05, pct):<24}{pct(c['fpr_at_threshold']):<24}{a['n_pos']}/{a['n_neg']}")
    held_rows = []
    for src, r in rep.get("leave_one_source_out", {}).get("sources", {}).items():
        for name in ("direct_vs_benign", "wrapped_vs_wrapped_benign"):
            if name not in r:  # a source without wrapped rows
                continue
            c = r[name]
            a = c["auroc"]
            auc = "n/a" if a["value"] is None else f"{a['value']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]"
            held_rows.append(f"{'LOSO ' + src + ' ' + name.split('_')[0]:<26}{auc:<24}{tpr_at_fpr_text(c, 0.01, pct):<24}"
                             f"{tpr_at_fpr_text(c, 0.05, pct):<24}{pct(c['tpr_at_threshold']):<24}"
                             f"{pct(c['fpr_at_threshold']):<24}{a['n_pos']}/{a['n_neg']}")
    lofo = rep.get("leave_one_family_out")
    nested = lofo.get("at_family_threshold_nested") if lofo and "skipped" not in lofo else None
    if lofo and "skipped" not in lofo:
        c = lofo["wrapped_vs_wrapped_benign"]
        a = c["auroc"]
        auc = "n/a" if a["value"] is None else f"{a['value']:.3f} [{a['ci95'][0]:.3f}, {a['ci95'][1]:.3f}]"
        # at the gate's own threshold: for a raised gate (family_fpr) the nested figure, the raise
        # set on other families (the in-sample one would be the target rate by construction)
        at = nested if nested else c
        held_rows.append(f"{'LOFO wrapped (train fam.)':<26}{auc:<24}{tpr_at_fpr_text(c, 0.01, pct):<24}"
                         f"{tpr_at_fpr_text(c, 0.05, pct):<24}{pct(at['tpr_at_threshold']):<24}"
                         f"{pct(at['fpr_at_threshold']):<24}{a['n_pos']}/{a['n_neg']}")
    if held_rows:
        lines.append(f"{'held out (refit without)':<26}{'AUROC [95% CI]':<24}{'TPR@1%FPR':<24}{'TPR@5%FPR':<24}"
                     f"{'caught@threshold':<24}{'FPR@threshold':<24}n+/n-")
        lines += held_rows
    if lofo and "skipped" in lofo:
        lines.append(f"leave-one-family-out skipped: {lofo['skipped']}")
    elif lofo:
        c = lofo["wrapped_vs_wrapped_benign"]
        if nested:
            lines.append(f"  LOFO: {lofo['families']} train template families in {len(lofo['folds'])} folds, at the gate's "
                         f"threshold (raised by {lofo['raise_for_family_fpr']:+.3f} for family_fpr; each fold's raise "
                         f"set on the other folds' families). Before the raise: {pct(c['tpr_at_threshold']).strip()} "
                         f"caught, {pct(c['fpr_at_threshold']).strip()} of wrapped safe prompts fire")
        else:
            lines.append(f"  LOFO: {lofo['families']} train template families in {len(lofo['folds'])} folds, at the gate's "
                         "threshold")
    if few_negatives(rep):
        lines.append(FEW_NEGATIVES_NOTE)
    return "\n".join(lines)
