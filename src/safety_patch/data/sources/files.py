"""User files: JSONL or CSV with a ``prompt`` (or ``goal``) column; optional ``category``, ``response``."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

from ...errors import SafetyPatchError
from ...jsonl import iter_jsonl
from ...textsim import normalise
from ..records import Request, SourceInfo
from ..refusals import unified_category

PROMPT_KEYS = ("prompt", "goal")


def _row_to_request(row: dict, where: str, source: str) -> Request:
    key = next((k for k in PROMPT_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)
    if key is None:
        raise SafetyPatchError(f"{where}: missing field 'prompt' (or 'goal')")
    text = row[key].strip()
    cat = str(row.get("category") or "harmful")
    bid = str(row.get("behavior_id") or f"user-{hashlib.sha256(normalise(text).encode()).hexdigest()[:12]}")
    resp = row.get("response") if isinstance(row.get("response"), str) and row["response"].strip() else None
    return Request(text, source, bid, unified_category(cat), cat, "user-provided", resp)


def read_prompt_rows(path: str | Path) -> list[tuple[str, dict]]:
    """(``file:line``, row) for every row of a JSONL or CSV file; errors name file and line."""
    path = Path(path)
    if not path.is_file():
        raise SafetyPatchError(f"prompt file not found: {path}")
    rows: list[tuple[str, dict]] = []
    try:
        if path.suffix.lower() in (".jsonl", ".json"):
            rows = [(f"{path}:{n}", obj) for n, obj in iter_jsonl(path)]
        elif path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if not reader.fieldnames or not set(PROMPT_KEYS) & {h.strip() for h in reader.fieldnames}:
                    raise SafetyPatchError(f"{path}:1: header has no 'prompt' or 'goal' column")
                for n, r in enumerate(reader, start=2):
                    rows.append((f"{path}:{n}", {k.strip(): v for k, v in r.items() if k}))
        else:
            raise SafetyPatchError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .csv")
    except UnicodeDecodeError as e:
        raise SafetyPatchError(f"{path}: not UTF-8 text ({e.reason})") from None
    if not rows:
        raise SafetyPatchError(f"{path}: no rows")
    return rows


def load_user_file(path: str, max_items: int | None = None):
    rows = read_prompt_rows(path)
    out = [_row_to_request(r, where, f"file:{Path(path).name}") for where, r in rows]
    info = SourceInfo(f"file:{Path(path).name}", "user-provided", "", str(Path(path).resolve()))
    return out[:max_items] if max_items else out, info
