"""Records that flow through the data stage."""

from __future__ import annotations

from dataclasses import asdict, dataclass

USER_LICENSE = "user-provided"
"""The ``license`` of a request read from a user's own file (data/sources/files.py)."""


@dataclass(frozen=True)
class Request:
    """One harmful request (a behaviour) from some source."""

    text: str
    source: str
    behavior_id: str
    category: str  # unified category (keys of refusals.json "reasons")
    raw_category: str = ""
    license: str = ""
    response: str | None = None  # a user file may bring its own refusal

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class SourceInfo:
    name: str
    license: str
    citation: str
    location: str
