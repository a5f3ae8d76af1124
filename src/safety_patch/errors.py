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
