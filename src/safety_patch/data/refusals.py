"""Refusal responses: varied, brief, category-aware, with a safe alternative where one exists.

A refusal is composed from resources/refusals.json: opener + category reason + (usually)
a category alternative, chosen by a seeded RNG per request. Dozens of openers/reasons/
alternatives give hundreds of distinct phrasings, so a patch learns *when* to refuse rather
than memorising one string.
"""

from __future__ import annotations

import json
import random
from functools import lru_cache
from importlib import resources


@lru_cache(maxsize=1)
def bank() -> dict:
    return json.loads(resources.files("safety_patch.resources").joinpath("refusals.json").read_text(encoding="utf-8"))


def unified_category(raw: str) -> str:
    """Map a source's category name to one of ours (fallback: 'harmful')."""
    b = bank()
    key = (raw or "").strip().lower()
    if key in b["reasons"]:
        return key
    return b["category_map"].get(key, "harmful")


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
