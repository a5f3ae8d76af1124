"""The one exception type users see.

Anything the user can fix (a bad path, an unknown name, a malformed file) raises
``SafetyPatchError`` with one line that names the file, line or field. The CLI prints
that line and exits non-zero; ``--debug`` adds the traceback. Everything else is a bug
and keeps its traceback.
"""

from __future__ import annotations


class SafetyPatchError(Exception):
    """A user-facing error: one clear line, non-zero exit, no traceback by default."""

    exit_code = 2


class FieldError(SafetyPatchError):
    """A config value out of range or of the wrong type, with the field(s) it names (``keys``,
    dotted: ``lora.rank``, ``val_fraction``; ``key`` is the first), so the code that read the
    config can say which file and line set them (``config.located``)."""

    def __init__(self, message: str, key: str, *more: str):
        super().__init__(message)
        self.keys = (key, *more)
        self.key = key


def check_text(text: str, where: str) -> str:
    """``text`` if it can be encoded as UTF-8; else SafetyPatchError naming ``where`` and the position.
    A lone surrogate (``\\ud800`` in JSON, or bytes that are not UTF-8 on a command line, which
    Python keeps as surrogate escapes) would otherwise reach the tokenizer, which fails with a
    ``TypeError``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SafetyPatchError(f"{where}: not valid Unicode text (a lone surrogate at character {e.start}; "
                               "bytes that are not UTF-8?)") from None
    return text


def field_path(loc) -> str:
    """A field's location in a user's file as one printable line: ``files.adapter_config.json``,
    ``rows[3].meta``. Names are the file's own keys, so a key that is not a plain printable
    name (a newline, a quote, an empty string, a dot inside it) is shown JSON-quoted in brackets
    (``files["\\n"]``): the error stays one line and says which key it means."""
    import json

    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            continue
        s = str(part)
        if not s or not s.isprintable() or any(c in s for c in "\"'[]") or s != s.strip():
            out += f"[{json.dumps(s)}]"
        else:
            out += f".{s}" if out else s
    return out
