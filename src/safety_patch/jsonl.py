"""Reading text files (JSONL, CSV, YAML) with errors that name file and line.

Lines are split on "\\n" only: ``str.splitlines`` also splits on U+2028 and friends, which
``json.dumps(..., ensure_ascii=False)`` leaves raw inside strings.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .errors import SafetyPatchError

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null", list: "list",
               dict: "object"}


def json_type(value: object) -> str:
    """The JSON name of a parsed value's type ("string", "integer", "list", "object", ...)."""
    return _JSON_TYPES.get(type(value), type(value).__name__)


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        dup = next(k for i, (k, _) in enumerate(pairs) if k in {k2 for k2, _ in pairs[:i]})
        raise ValueError(f"duplicate key {dup!r}")
    return obj


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def loads_strict(text: str, where: str) -> object:
    """``json.loads`` that refuses what would silently change meaning: a repeated key (json keeps the
    last), NaN/Infinity (not JSON) and lone surrogate escapes (no UTF-8 text holds them).

    Raises ``SafetyPatchError("{where}: invalid JSON (...)")``.
    """
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys, parse_constant=_no_constant)
        if "\\u" in text:  # only an escape can smuggle in a lone surrogate
            json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise SafetyPatchError(f"{where}: invalid JSON (a string holds a lone surrogate escape)") from None
    except RecursionError:
        raise SafetyPatchError(f"{where}: invalid JSON (nested too deeply)") from None
    except json.JSONDecodeError as e:  # its .msg alone reads "Unterminated string starting at": say where
        raise SafetyPatchError(f"{where}: invalid JSON ({e.msg}: column {e.colno})") from None
    except ValueError as e:
        raise SafetyPatchError(f"{where}: invalid JSON ({e})") from None
    return obj


BOM = "\ufeff"


def read_text(path: str | Path, what: str = "") -> str:
    """A text file's content: UTF-8, a leading byte-order mark dropped (Excel's "CSV UTF-8" and
    Windows PowerShell write one; it is not part of the first field or key).

    Raises SafetyPatchError naming the file: missing, unreadable, or not UTF-8, the last naming the
    line and the byte in it where decoding failed. ``what`` ("config ", "prompt file "): how the
    messages name the file.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise SafetyPatchError(f"{what}file not found: {path}") from None
    except OSError as e:
        raise SafetyPatchError(f"cannot read {what}{path}: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        byte = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise SafetyPatchError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {byte} of the line); save the file "
                               "as UTF-8") from None
    return text.removeprefix(BOM)


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line of a JSONL file.

    Raises ``SafetyPatchError`` naming the file (and line) when it is missing, unreadable, not
    UTF-8 (:func:`read_text`; a leading byte-order mark is dropped), or a line is not one JSON
    object (see ``loads_strict``).
    """
    path = Path(path)
    text = read_text(path)
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        obj = loads_strict(line, f"{path}:{n}")
        if not isinstance(obj, dict):
            raise SafetyPatchError(f"{path}:{n}: expected a JSON object, got {json_type(obj)}")
        yield n, obj


def read_jsonl(path: str | Path) -> list[dict]:
    return [obj for _, obj in iter_jsonl(path)]
