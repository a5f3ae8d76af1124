"""How the report writes figures (rates with n, means, ratios) and compares two 95% intervals."""

from __future__ import annotations


def kl_side(r: str) -> str:
    """``compare``'s word for LoRA's KL interval against an arm's, in words a reader cannot misread."""
    return {"better": "LoRA's KL interval lies below this arm's", "worse": "LoRA's KL interval lies above this arm's"}.get(
        r, "the KL intervals overlap, or one is missing")


def pct(p) -> str:
    """A rate (a stats.py estimate: value and ci95 in [0, 1]) in percent with its interval: "7.5% [2.6, 19.9]"."""
    if not p or p.get("value") is None:
        return "-"
    return f"{100 * p['value']:.1f}% [{100 * p['ci95'][0]:.1f}, {100 * p['ci95'][1]:.1f}]"


def pct_kn(p) -> str:
    """:func:`pct` with the count behind it: "7.5% [2.6, 19.9] (3/40)"."""
    if not p or p.get("value") is None:
        return "-"
    return f"{pct(p)} ({p['k']}/{p['n']})" if "k" in p and "n" in p else pct(p)


def num(m, digits=4) -> str:
    """A mean with its interval; values too small for ``digits`` decimals in 3 significant digits, so a
    small nonzero KL is not printed as the zero-width ``0.0000 [0.0000, 0.0000]``."""
    if not m or m.get("value") is None:
        return "-"
    ci = m.get("ci95") or [None]
    small = any(isinstance(x, (int, float)) and x != 0 and abs(x) < 10 ** -digits for x in [m["value"], *ci])
    spec = ".3g" if small else f".{digits}f"
    if None in ci:
        return f"{m['value']:{spec}} (no interval, n {m.get('n')})"
    return f"{m['value']:{spec}} [{ci[0]:{spec}}, {ci[1]:{spec}}]"


def compare(a: dict, b: dict, lower_is_better: bool = True) -> str:
    """'better' / 'worse' when the 95% intervals do not overlap, else 'tie'."""
    (alo, ahi), (blo, bhi) = a["ci95"], b["ci95"]
    if None in (alo, ahi, blo, bhi):
        return "tie"
    if ahi < blo:
        return "better" if lower_is_better else "worse"
    if alo > bhi:
        return "worse" if lower_is_better else "better"
    return "tie"


def fmt(x) -> str:
    """A bare number in 4 significant digits; "-" for none."""
    return "-" if x is None else f"{x:.4g}"


def arm_key(name: str) -> str:
    """An arm's name as the analysis stage's rows name its patch (the pipeline links ``name@s1`` as ``name_s1``)."""
    return name.replace("@", "_")
