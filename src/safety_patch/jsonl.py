"""Reading JSONL with errors that name file and line.

Lines are split on "\\n" only: ``str.splitlines`` also splits on U+2028 and friends, which
``json.dumps(..., ensure_ascii=False)`` leaves raw inside strings.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .errors import SafetyPatchError


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SafetyPatchError(f"file not found: {path}") from None
    except UnicodeDecodeError as e:
        raise SafetyPatchError(f"{path}: not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise SafetyPatchError(f"cannot read {path}: {e.strerror or e}") from None
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise SafetyPatchError(f"{path}:{n}: invalid JSON ({getattr(e, 'msg', e)})") from None
        if not isinstance(obj, dict):
            raise SafetyPatchError(f"{path}:{n}: expected a JSON object")
        yield n, obj


def read_jsonl(path: str | Path) -> list[dict]:
    return [obj for _, obj in iter_jsonl(path)]
