"""A gate's discrimination, as numbers with n and a 95% interval: AUROC (Mann-Whitney, with
Newcombe's score interval, ``evaluation.stats.auroc_interval``), true-positive rate at 1% and 5%
false-positive rate, the rates at a threshold, and the threshold that gives a target
false-positive rate."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..errors import SafetyPatchError
from .pool import HELD_OUT_SETS


def attack_report(scores: dict[str, dict[str, torch.Tensor]], threshold: float) -> dict:
    """Per attack: the share of harmful requests the gate fires on under it (caught), of its
    benign controls (false positives), each with n and a Wilson interval, and their AUROC."""
    from ..evaluation.stats import proportion

    return {a: {"caught": proportion(int((s["harmful"] > threshold).sum()), len(s["harmful"])),
                "fired_on_benign": proportion(int((s["benign"] > threshold).sum()), len(s["benign"])),
                "auroc": _auroc_ci(s["harmful"].tolist(), s["benign"].tolist())}
            for a, s in scores.items()}


def threshold_at_fpr(negatives: torch.Tensor, fpr: float) -> float:
    """The smallest sorted negative logit t with share(negatives > t) <= ``fpr`` (a gate fires on
    logit > threshold). Raises SafetyPatchError without negatives."""
    s = sorted((float(v) for v in negatives), reverse=True)
    if not s:
        raise SafetyPatchError("no benign prompts to set a threshold at a false-positive rate on")
    k = int(math.floor(fpr * len(s) + 1e-9))  # at most k negatives may lie above the threshold
    return s[min(k, len(s) - 1)]


BOOTSTRAP_DRAWS = 2000


def tpr_at_fpr_bootstrap(pos: torch.Tensor, neg: torch.Tensor, fpr: float, draws: int = BOOTSTRAP_DRAWS,
                         seed: int = 0) -> list[float]:
    """Percentile-bootstrap 95% interval [lo, hi] of the TPR at ``fpr`` when the threshold is itself
    read off ``neg`` (:func:`threshold_at_fpr`): each draw resamples the positives ``pos`` [n_pos] and
    the negatives ``neg`` [n_neg] (logits) with replacement, sets the threshold on the drawn
    negatives and counts the drawn positives above it. Wilson's interval holds the threshold fixed;
    with a few dozen negatives the threshold is set by two or three of them, and this interval
    carries that too. ``draws`` resamples from a torch generator seeded ``seed``: the positives' [draws,
    n_pos] indices, then the negatives' [draws, n_neg]. Raises SafetyPatchError without negatives or
    positives."""
    if not len(pos) or not len(neg):
        raise SafetyPatchError("a bootstrap of the TPR at an FPR needs harmful and benign logits")
    g = torch.Generator().manual_seed(seed)
    ip = torch.randint(len(pos), (draws, len(pos)), generator=g)
    ineg = torch.randint(len(neg), (draws, len(neg)), generator=g)
    k = min(int(math.floor(fpr * len(neg) + 1e-9)), len(neg) - 1)  # as threshold_at_fpr reads it
    t = neg.double()[ineg].sort(dim=1, descending=True).values[:, k]
    tpr = (pos.double()[ip] > t[:, None]).double().mean(dim=1).sort().values
    return [float(tpr[int(0.025 * draws)]), float(tpr[int(0.975 * draws) - 1])]


def auroc(pos: Sequence[float], neg: Sequence[float]) -> float:
    """Area under the ROC curve (Mann-Whitney U / (n_pos n_neg), ties counted half)."""
    from scipy.stats import rankdata

    ranks = rankdata(list(pos) + list(neg))
    n_pos, n_neg = len(pos), len(neg)
    return float((ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _auroc_ci(pos: Sequence[float], neg: Sequence[float]) -> dict:
    """AUROC with Newcombe's score 95% interval (:func:`stats.auroc_interval`; gate files before
    2026-12-04 carry a stratified percentile-bootstrap interval, ``"interval": "bootstrap"``)."""
    from ..evaluation.stats import auroc_interval

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
    from ..evaluation.stats import proportion

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
    from ..evaluation.stats import proportion

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


def _by_set(rows: torch.Tensor, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """Rows of :func:`held_out_features` (or anything computed row by row from them) by set."""
    out, at = {}, 0
    for k in HELD_OUT_SETS:
        if sizes.get(k):
            out[k], at = rows[at : at + sizes[k]], at + sizes[k]
    return out
