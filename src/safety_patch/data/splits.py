"""Leak-free splits: by behaviour group and template family, never by row.

Requests are grouped first (exact normalised duplicates and near-duplicates by word
3-gram Jaccard >= ``threshold`` share a group); whole groups go to one split, stratified by
category, in an order fixed by sha256(seed, group). ``check_no_leaks`` re-verifies the
result independently, so a bug in grouping cannot silently leak.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence

from ..errors import SafetyPatchError
from ..textsim import cluster, cross_pairs

SPLITS = ("train", "val", "test")


def _order(seed: int, key: str) -> str:
    return hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()


def assign(keys: Sequence[str], strata: Sequence[str], fractions: dict[str, float], seed: int) -> dict[str, str]:
    """Map each distinct key to a split; within each stratum, the first test share, then val, rest train."""
    by_stratum: dict[str, list[str]] = defaultdict(list)
    for k, s in zip(keys, strata, strict=True):
        if k not in by_stratum[s]:
            by_stratum[s].append(k)
    out: dict[str, str] = {}
    for s in sorted(by_stratum):
        ks = sorted(by_stratum[s], key=lambda k: _order(seed, k))
        n = len(ks)
        n_test = round(n * fractions.get("test", 0))
        n_val = round(n * fractions.get("val", 0))
        for i, k in enumerate(ks):
            out[k] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    return out


def behaviour_groups(texts: Sequence[str], ids: Sequence[str], threshold: float) -> list[str]:
    """A group id per request: same behaviour id or near-duplicate text -> same group."""
    cl = cluster(texts, threshold, n=3)
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for i, (bid, c) in enumerate(zip(ids, cl, strict=True)):
        a, b = find(f"id:{bid}"), find(f"cl:{c}")
        if a != b:
            parent[max(a, b)] = min(a, b)
        find(f"row:{i}")
    return [find(f"id:{bid}") for bid in ids]


def check_no_leaks(rows_by_split: dict[str, list[dict]], threshold: float, key: str = "request") -> None:
    """Fail loudly if a behaviour id, template family or near-duplicate text is in two splits."""
    for field in ("behavior_id", "template_family"):
        seen: dict[str, str] = {}
        for split, rows in rows_by_split.items():
            for r in rows:
                v = r.get(field)
                if not v or v == "direct":
                    continue
                if seen.setdefault(v, split) != split:
                    raise SafetyPatchError(f"leak: {field} {v!r} is in both {seen[v]} and {split}")
    names = list(rows_by_split)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            ta = [r[key] for r in rows_by_split[a]]
            tb = [r[key] for r in rows_by_split[b]]
            pairs = cross_pairs(ta, tb, threshold)
            if pairs:
                x, y, sim = pairs[0]
                raise SafetyPatchError(f"leak: near-duplicate requests across {a}/{b} (Jaccard {sim:.2f}): {ta[x][:80]!r} ~ {tb[y][:80]!r}")
