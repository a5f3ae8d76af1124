"""Confidence intervals: Wilson for proportions, Newcombe's score interval for an AUROC, percentile
bootstrap for means and differences."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence


def wilson(k: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval for k successes out of n (95% by default); (0, 1) when n = 0."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)  # exact ends: float rounding must not exclude p itself
    return (min(lo, p), max(hi, p))


def proportion(k: int, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {"value": k / n if n else None, "k": k, "n": n, "ci95": [lo, hi], "interval": "wilson"}


def auroc_interval(theta: float, n_pos: int, n_neg: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% interval of an AUROC ``theta`` (the Mann-Whitney estimate) from ``n_pos`` positives and
    ``n_neg`` negatives: Newcombe's score-type interval with the Hanley-McNeil variance, its two
    sample sizes replaced by their mean N* = (n_pos + n_neg)/2 (R. G. Newcombe, "Confidence
    intervals for an effect size measure based on the Mann-Whitney statistic. Part 2", Stat Med
    25:559-573, 2006, method 5):

        var(t) = t(1 - t) / (n_pos n_neg) * [1 + (N* - 1) ((1 - t)/(2 - t) + t/(1 + t))]

    The ends are the t where (t - theta)^2 = z^2 var(t). Unlike a percentile bootstrap or a Wald
    interval, it has width at perfect separation (theta = 1 on 40 vs 40 prompts gives [0.95, 1]) and
    at n = 1 ([0.21, 1]), where those read as certainty. Raises ValueError without both classes or
    for theta outside [0, 1]."""
    if n_pos < 1 or n_neg < 1:
        raise ValueError(f"an AUROC interval needs both classes, got {n_pos} positives and {n_neg} negatives")
    if not 0.0 <= theta <= 1.0:
        raise ValueError(f"an AUROC must lie in [0, 1], got {theta}")
    from scipy.optimize import brentq

    n_star = (n_pos + n_neg) / 2

    def f(t: float) -> float:
        var = t * (1 - t) / (n_pos * n_neg) * (1 + (n_star - 1) * ((1 - t) / (2 - t) + t / (1 + t)))
        return (t - theta) ** 2 - z * z * var

    # f(0) = theta^2 >= 0, f(1) = (1 - theta)^2 >= 0 and f < 0 just inside [0, 1] at theta (var
    # vanishes at t = 0 and 1, so at theta = 1 the lower end's bracket starts just below 1)
    mid = min(max(theta, 1e-12), 1 - 1e-12)
    if f(mid) >= 0:  # only in float underflow at astronomically large n: the interval is the point
        return (theta, theta)
    lo = 0.0 if f(0.0) <= 0 else brentq(f, 0.0, mid, xtol=1e-14)
    hi = 1.0 if f(1.0) <= 0 else brentq(f, mid, 1.0, xtol=1e-14)
    return (min(lo, theta), max(hi, theta))


SMALL_N = 10
"""Below this many values a mean's interval is Student's t, not the percentile bootstrap: the bootstrap
of a few values is about their range (two values: exactly [min, max]) and covers far less than 95%."""


def bootstrap_mean(xs: Sequence[float], n_boot: int = 2000, seed: int = 0, lower: float | None = None) -> dict:
    """Mean with a percentile-bootstrap 95% interval; from 2 to ``SMALL_N`` - 1 values a Student-t
    interval (``interval`` says which). With one value there is no interval (a bootstrap of one
    value has zero width, which reads as certainty): ``ci95`` is [None, None] then, as for no values.
    ``lower``: the least value the quantity can take (0 for an NLL or a KL); the symmetric t interval
    is cut there rather than reaching values that cannot occur (the bootstrap never does)."""
    xs = list(xs)
    if len(xs) < 2:
        return {"value": xs[0] if xs else None, "n": len(xs), "ci95": [None, None], "interval": "bootstrap"}
    if len(xs) < SMALL_N:
        from scipy.stats import t

        n = len(xs)
        m = sum(xs) / n
        half = float(t.ppf(0.975, n - 1)) * statistics.stdev(xs) / math.sqrt(n)
        lo = m - half if lower is None else max(lower, m - half)
        return {"value": m, "n": n, "ci95": [lo, m + half], "interval": "student-t"}
    rng = random.Random(seed)
    n = len(xs)
    means = sorted(sum(xs[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    return {"value": sum(xs) / n, "n": n, "ci95": [means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]],
            "interval": "bootstrap"}


def paired_bootstrap_diff(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict:
    """CI of mean(b - a) over paired items (patched minus base)."""
    return bootstrap_mean([y - x for x, y in zip(a, b, strict=True)], n_boot, seed)


FEW_NEGATIVES = "†"
"""Marks a TPR at an FPR read off fewer than 1/FPR benign prompts (``gate.metrics.discrimination``): the
TPR at 0% FPR. Printed tables end with :data:`FEW_NEGATIVES_NOTE` when any figure has it."""
FEW_NEGATIVES_NOTE = (f"{FEW_NEGATIVES} fewer benign prompts than 1/FPR (100 for 1%, 20 for 5%): no benign prompt may "
                      "fire, so this is the TPR at 0% FPR")


def tpr_at_fpr_text(c: dict, f: float, fmt) -> str:
    """``c``'s TPR at FPR ``f`` formatted by ``fmt`` (a proportion dict -> str), marked with
    :data:`FEW_NEGATIVES` when it was read off too few benign prompts."""
    p = c.get(f"tpr_at_fpr_{f:g}") or {}
    return fmt(p) + (FEW_NEGATIVES if p.get("too_few_negatives") else "")


def few_negatives(rep) -> bool:
    """Whether any TPR at an FPR anywhere in a report was read off too few benign prompts."""
    if isinstance(rep, dict):
        return rep.get("too_few_negatives") is True or any(few_negatives(v) for v in rep.values())
    if isinstance(rep, list):
        return any(few_negatives(v) for v in rep)
    return False
