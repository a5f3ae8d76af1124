"""Refusal responses: varied, brief, category-aware, with a safe alternative where one exists.

A refusal is composed from resources/refusals.json: opener + category reason + (usually)
a category alternative, chosen by a seeded RNG per request. Dozens of openers/reasons/
alternatives give hundreds of distinct phrasings, so a patch learns *when* to refuse rather
than memorising one string.
"""

from __future__ import annotations

import json
import random
import re
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def bank() -> dict:
    return json.loads(resources.files("safety_patch.resources").joinpath("refusals.json").read_text(encoding="utf-8"))


def category_key(raw: str) -> str:
    """A category name as the map spells it: lower case, runs of other characters as one ``_``
    ("Self-Harm", "self harm" and "SELF_HARM" are all ``self_harm``)."""
    return re.sub(r"[^a-z0-9]+", "_", (raw or "").lower()).strip("_")


def unified_category(raw: str) -> str:
    """Map a source's category name to one of ours: a unified name itself, else the
    ``category_map`` of resources/refusals.json (source categories and common synonyms such as
    ``weapons``, ``cyber``, ``hate``, ``suicide``), else ``harmful`` (the generic refusal).
    See :func:`is_generic_fallback` for the names that took the fallback."""
    b = bank()
    key = category_key(raw)
    if key in b["reasons"]:
        return key
    return b["category_map"].get(key, "harmful")


def is_generic_fallback(raw: str) -> bool:
    """True when ``raw`` is neither a unified category nor in the map and so fell back to
    ``harmful``: its rows get the generic refusal, not their category's reason and alternative.
    No category at all (``""``) is not a fallback: ``harmful`` is what it says."""
    b = bank()
    key = category_key(raw)
    return bool(key) and key not in b["reasons"] and key not in b["category_map"]


def compose(category: str, rng: random.Random, alternative_p: float = 0.8) -> str:
    b = bank()
    cat = category if category in b["reasons"] else "harmful"
    parts = [rng.choice(b["openers"]), rng.choice(b["reasons"][cat])]
    if b["alternatives"].get(cat) and rng.random() < alternative_p:
        parts.append(rng.choice(b["alternatives"][cat]))
    return " ".join(parts)


def n_phrasings() -> int:
    """How many distinct refusals ``compose`` can produce (reported in the manifest)."""
    b = bank()
    total = 0
    for cat, reasons in b["reasons"].items():
        alts = len(b["alternatives"].get(cat, []))
        total += len(b["openers"]) * len(reasons) * (alts + 1)
    return total


@lru_cache(maxsize=1)
def markers() -> tuple[str, ...]:
    """Openers, lower-cased: what a keyword judge must recognise as refusals at minimum."""
    return tuple(o.lower().rstrip(".") for o in bank()["openers"])
