"""Confidence intervals: Wilson for proportions, percentile bootstrap for means and differences."""

from __future__ import annotations

import math
import random
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


def bootstrap_mean(xs: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict:
    """Mean with a percentile-bootstrap 95% interval. With one value there is no interval (a bootstrap of one
    value has zero width, which reads as certainty): ``ci95`` is [None, None] then, as for no values."""
    xs = list(xs)
    if len(xs) < 2:
        return {"value": xs[0] if xs else None, "n": len(xs), "ci95": [None, None], "interval": "bootstrap"}
    rng = random.Random(seed)
    n = len(xs)
    means = sorted(sum(xs[rng.randrange(n)] for _ in range(n)) / n for _ in range(n_boot))
    return {"value": sum(xs) / n, "n": n, "ci95": [means[int(0.025 * n_boot)], means[int(0.975 * n_boot) - 1]],
            "interval": "bootstrap"}


def paired_bootstrap_diff(a: Sequence[float], b: Sequence[float], n_boot: int = 2000, seed: int = 0) -> dict:
    """CI of mean(b - a) over paired items (patched minus base)."""
    return bootstrap_mean([y - x for x, y in zip(a, b, strict=True)], n_boot, seed)


FEW_NEGATIVES = "†"
"""Marks a TPR at an FPR read off fewer than 1/FPR benign prompts (``gate_fit.discrimination``): the
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
