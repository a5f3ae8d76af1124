"""The audit log: one JSON line per chat-completion request, appended as the request ends.

Fields: ``time`` (UTC ISO-8601, when the request arrived), ``id``, ``status`` (HTTP status),
``model``, ``decision`` (``base`` | ``patched`` | ``always``; absent if the request was rejected
before routing), ``gates`` (patch folder name, patch_id, layer, logit, threshold, fired),
``active_patches`` (folder names) and ``active_patch_ids``,
``prompt_tokens``, ``completion_tokens``, ``finish_reason`` (``stop`` | ``length`` |
``cancelled`` when the client went away), ``latency_s``, ``stream``, ``error`` (4xx/5xx only).
No prompt or answer text unless the server runs with ``--log-prompts`` (then ``messages`` and
``completion``).

Each line is written with one ``write`` on a file opened for appending, under a lock, and
flushed, so concurrent requests never interleave and a crash loses at most the line being
written.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

from ..errors import SafetyPatchError


def check_audit_path(path: str | Path) -> None:
    """Refuse, before a server loads its model and announces its URL, an audit log path it could not
    open for appending: a directory, a file it may not write, or under a folder it cannot create or
    write. Creates nothing (a start that fails later leaves no empty log behind). Raises SafetyPatchError."""
    p = Path(path)
    why = None
    if p.is_dir():
        why = "Is a directory"
    elif p.exists():
        why = None if os.access(p, os.W_OK) else "Permission denied"
    else:
        parent = p.parent
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if not parent.is_dir():
            why = f"{parent} is not a directory"
        elif not os.access(parent, os.W_OK | os.X_OK):
            why = f"cannot create it under {parent}: Permission denied"
    if why:
        raise SafetyPatchError(f"cannot open the audit log {p} for appending: {why}")


class AuditLog:
    """Append-only JSONL audit log; ``path=None`` keeps nothing (tests, benchmarks)."""

    def __init__(self, path: str | Path | None, log_prompts: bool = False):
        self.path = Path(path) if path is not None else None
        self.log_prompts = log_prompts
        self._lock = threading.Lock()
        self._fh = None
        if self.path is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # O_APPEND: every write lands at the end, even with another writer on the same file.
                self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - held open for the server's life
            except OSError as e:
                raise SafetyPatchError(f"cannot open the audit log {self.path} for appending: {e.strerror or e}") from None

    def write(self, record: dict) -> None:
        """Append one record (prompt/answer text fields dropped unless ``log_prompts``)."""
        if self._fh is None:
            return
        if not self.log_prompts:
            record = {k: v for k, v in record.items() if k not in ("messages", "completion")}
        line = json.dumps(record, ensure_ascii=False, sort_keys=False) + "\n"
        with self._lock:
            self._fh.write(line)
            self._fh.flush()
            os.fsync(self._fh.fileno())

    def close(self) -> None:
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None
