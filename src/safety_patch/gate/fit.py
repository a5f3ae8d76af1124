"""Fitting a gate on a data folder (``fit_gate_on_data``: what ``gate fit`` and ``train`` both call,
so a gated patch's gate and a gate folder's are the same fit): read the pool's features, fit the
logistic probe, set the threshold (a fixed logit, or a target FPR on the validation benign pool
raised to a per-family FPR on out-of-family wrapped prompts), and score the validation sets."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence

import torch

from ..errors import SafetyPatchError
from .config import BATCHING, Batching, GateFitConfig, _norm_of, model_layers
from .features import FeatureBank, _layer_tuple, _read, encode, pool_features
from .metrics import _by_set, discrimination, reliability, threshold_at_fpr
from .pool import HELD_OUT_SETS, gate_prompts, held_out_prompts, template_family
from .probe import Gate


def fit_gate_probe(x: torch.Tensor, y: torch.Tensor, layer: int | Sequence[int], cfg: GateFitConfig,
                   norm: dict) -> Gate:
    """The probe on features ``x`` ([n, k·hidden] residual states of the k layers ``layer``, in
    order) with labels ``y``: a residual gate (standardised, with intercept) or, with ``norm``, a
    final-norm gate without intercept. With several layers, ``cfg.extra_weight`` scales the later
    layers' standardised features in the fit (``gate.fit_probe``'s ``feature_scale``)."""
    from .probe import fit_probe

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
    from ..data.folder import DataFolder

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


LOFO_FOLDS = 5
"""Groups of train template families :func:`leave_one_family_out` refits without, one at a time."""


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
