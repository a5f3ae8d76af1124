"""Text normalisation and near-duplicate detection (word n-gram shingles + Jaccard).

Used to deduplicate sources, cluster jailbreak templates into families and keep
near-duplicates from crossing splits. Pure Python; a few thousand texts take seconds.
"""

from __future__ import annotations

import re
import unicodedata
from collections import defaultdict
from collections.abc import Sequence

_WS = re.compile(r"\s+")
_NONWORD = re.compile(r"[^\w\s]")
NO_SPACE = "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
"""Scripts written without spaces between words (Thai, Lao, Myanmar, Khmer, kana, CJK ideographs): each
character counts as one word, here and in the judges (judges/text.py)."""
WORDS = re.compile(rf"[{NO_SPACE}]|[^\W{NO_SPACE}]+")
"""A word: one character of a script without spaces, or a run of other word characters."""


def normalise(text: str) -> str:
    """Case-, accent-, punctuation- and whitespace-insensitive form for exact-dup checks."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    return _WS.sub(" ", _NONWORD.sub(" ", text)).strip()


def tokens(text: str) -> list[str]:
    """The words of ``normalise(text)``; in scripts without spaces, one per character (a Chinese request
    is otherwise one "word", and two that differ in one character share no shingle)."""
    return WORDS.findall(normalise(text))


def shingles(text: str, n: int = 3) -> frozenset[str]:
    words = tokens(text)
    if len(words) < n:
        return frozenset([" ".join(words)]) if words else frozenset()
    return frozenset(" ".join(words[i : i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def cluster(texts: Sequence[str], threshold: float, n: int = 3) -> list[int]:
    """Union-find over pairs with Jaccard >= threshold; returns a cluster id per text.

    Candidate pairs come from an inverted index on shingles, so texts sharing nothing are
    never compared. Cluster ids are the smallest member index: deterministic.
    """
    sh = [shingles(t, n) for t in texts]
    parent = list(range(len(texts)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    index: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(sh):
        for g in s:
            index[g].append(i)
    checked: set[tuple[int, int]] = set()
    for i, s in enumerate(sh):
        cands = {j for g in s for j in index[g] if j > i}
        for j in cands:
            if (i, j) in checked:
                continue
            checked.add((i, j))
            if find(i) != find(j) and jaccard(s, sh[j]) >= threshold:
                a, b = find(i), find(j)
                parent[max(a, b)] = min(a, b)
    return [find(i) for i in range(len(texts))]


def cross_pairs(a: Sequence[str], b: Sequence[str], threshold: float, n: int = 3) -> list[tuple[int, int, float]]:
    """Pairs (i in a, j in b) whose Jaccard similarity is >= threshold, or that normalise equal."""
    sa = [shingles(t, n) for t in a]
    sb = [shingles(t, n) for t in b]
    na = [normalise(t) for t in a]
    nb_index: dict[str, list[int]] = defaultdict(list)
    for j, t in enumerate(b):
        nb_index[normalise(t)].append(j)
    index: dict[str, list[int]] = defaultdict(list)
    for j, s in enumerate(sb):
        for g in s:
            index[g].append(j)
    out = []
    for i, s in enumerate(sa):
        hits = {j: 1.0 for j in nb_index.get(na[i], [])}
        for j in {j for g in s for j in index[g]}:
            sim = jaccard(s, sb[j])
            if sim >= threshold:
                hits[j] = max(hits.get(j, 0.0), sim)
        out.extend((i, j, sim) for j, sim in sorted(hits.items()))
    return out
