"""Output paths: checked before any work, claimed against concurrent writers.

Every command that writes (``--out``) calls :func:`check_out_dir` or :func:`check_out_file`
at the CLI boundary, before it loads a model or reads data, so a path that cannot be
written fails in one line (exit 2) instead of after the work is done; and holds
:func:`claim_output` for the whole command, so a second writer into the same ``--out``
gets one clear error instead of silently replacing (or deleting) the first one's work.

Rules, for every command:

* ``--out`` may not be, contain or lie inside one of the command's inputs (a data folder,
  a patch, a model folder): replacing it would destroy the input.
* An existing, non-empty output folder is replaced only with ``--overwrite`` and only when it
  looks like one of ours of the same kind (:data:`MARKERS`); we never replace a user's folder.
* Kernel pseudo-filesystems (``/proc``, ``/sys``, ``/dev``) are refused by name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from .errors import SafetyPatchError

# Marker files by kind of output folder: a folder holding one of them was written by us.
MARKERS: dict[str, tuple[str, ...]] = {
    "data": ("manifest.json",),
    "patch": ("patch.json",),
    "analysis": ("summary.json", "weights.csv"),
    "merged": ("merged_from.json",),
    "round": ("heldout.json", "round.json", ".redteam-round"),
    "run": ("run.json", "01-data", "02-arms", "03-eval", "04-plug", "05-analysis"),
    "model": ("config.json",),
    "gate": ("gate.json",),
    "exported-gate": ("safety_patch_gate.json",),
}
PSEUDO_FS = ("/proc", "/sys", "/dev")


def looks_like(path: Path, kind: str) -> bool:
    """True when folder ``path`` holds one of ``kind``'s marker files (written by safety-patch)."""
    return any((Path(path) / m).exists() for m in MARKERS[kind])


def _is_within(p: Path, root: Path) -> bool:
    return p == root or p.is_relative_to(root)


def _check_common(out: Path, flag: str, inputs: Iterable[str | Path | None]) -> Path:
    """Checks shared by files and folders; returns the nearest existing folder above ``out``."""
    if not str(out) or str(out).strip() != str(out):
        raise SafetyPatchError(f"{flag} {str(out)!r} is not a usable path")
    real = out.resolve()
    for root in PSEUDO_FS:
        if _is_within(real, Path(root)):
            raise SafetyPatchError(f"cannot write {flag} {out}: {root} is a kernel filesystem, not a place for files")
    for given in inputs:
        if given is None or not str(given) or str(given) == "default":
            continue
        src = Path(given).expanduser()
        if not src.exists():
            continue  # a hub id or a missing input (its own check names it)
        rs = src.resolve()
        if real == rs:
            raise SafetyPatchError(f"{flag} {out} is the input {given}; writing it would destroy the input")
        if real.is_relative_to(rs):
            raise SafetyPatchError(f"{flag} {out} lies inside the input {given}; choose a folder outside it")
        if rs.is_relative_to(real):
            raise SafetyPatchError(f"{flag} {out} contains the input {given}; choose a folder that does not")
    # The nearest existing ancestor must be a folder we can create entries in.
    anc = out.parent
    while not anc.exists() and anc != anc.parent:
        if anc.is_symlink():  # a dangling link: mkdir would fail on it
            raise SafetyPatchError(f"cannot write {flag} {out}: {anc} is a broken symbolic link")
        anc = anc.parent
    if not anc.is_dir():
        raise SafetyPatchError(f"cannot write {flag} {out}: {anc} is a file, not a folder")
    try:  # access() cannot see read-only mounts, immutable folders or root's limits: try it
        os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=anc))
    except OSError as e:
        raise SafetyPatchError(f"cannot write {flag} {out}: {anc} is not writable ({e.strerror or e})") from None
    return anc


CHECKED: list[Path] = []
"""Every output path checked in this process, in order: the CLI's summary line names those that exist at the end."""


def with_article(word: str) -> str:
    """``word`` after "a" or "an" ("an exported-gate", "a patch"), for messages that name a kind."""
    return ("an " if word[:1].lower() in "aeiou" else "a ") + word


def check_out_dir(out: str | Path, *, flag: str = "--out", inputs: Iterable[str | Path | None] = (),
                  overwrite: bool | None = False, kind: str | None = None, reuse: bool = False) -> Path:
    """Check an output *folder* before any work; raise ``SafetyPatchError`` (one line) if unusable.

    ``overwrite``: the command's ``--overwrite`` (None: the command has none). ``kind``: a key
    of :data:`MARKERS`; an existing non-empty folder is replaced only if it is of this kind.
    ``reuse``: the command resumes in an existing folder of this kind (``reproduce``), so the
    folder itself (not its parent) must be writable. Returns ``out`` as a ``Path``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SafetyPatchError(f"{flag} {out} exists and is a file; give a folder name")
    _check_common(out, flag, inputs)
    if out.is_dir() and any(out.iterdir()):
        if overwrite is None and not reuse:
            raise SafetyPatchError(f"{out} exists; choose a new folder (remove it or choose another path)")
        if not overwrite and not reuse:
            raise SafetyPatchError(f"{out} exists and is not empty; pass --overwrite to replace it")
        if kind is not None and not looks_like(out, kind):
            raise SafetyPatchError(f"{flag} {out} exists, is not empty and is not {with_article(kind)} folder written by safety-patch "
                                   f"(no {MARKERS[kind][0]}); refusing to {'write into' if reuse else 'replace'} it")
    if reuse and out.is_dir():  # empty or not, the command writes inside this very folder
        try:
            os.rmdir(tempfile.mkdtemp(prefix=".probe-", dir=out))
        except OSError as e:
            raise SafetyPatchError(f"cannot write {flag} {out}: not writable ({e.strerror or e})") from None
    CHECKED.append(out)
    return out


def _results_kind(path: Path) -> str | None:
    """The ``kind`` of a results JSON safety-patch wrote (``safety-patch/...``), or None for any other file."""
    import json

    try:
        with open(path, "rb") as f:
            head = f.read(1)
            if head != b"{":
                return None
            f.seek(0)
            kind = json.load(f).get("kind")
    except (OSError, ValueError):
        return None
    return kind if isinstance(kind, str) and kind.startswith("safety-patch/") else None


def check_out_file(out: str | Path, *, flag: str = "--out", inputs: Iterable[str | Path | None] = (),
                   overwrite: bool = False, kind: str | None = None) -> Path:
    """Check an output *file* (results JSON) before any work; raise ``SafetyPatchError`` if unusable.

    An existing file is replaced only with ``overwrite`` (the command's ``--overwrite``) and only when
    it is a results file safety-patch wrote (a JSON object whose ``kind`` starts ``safety-patch/``; of
    this ``kind`` when given): a command never replaces a user's file, nor silently an earlier result."""
    out = Path(out)
    if out.is_dir():
        raise SafetyPatchError(f"{flag} {out} is a directory; give a file name")
    if out.exists() and not out.is_file():
        raise SafetyPatchError(f"{flag} {out} exists and is not a regular file")
    _check_common(out, flag, inputs)  # an input named as --out is that error, not "exists"
    if out.exists():
        if not overwrite:
            raise SafetyPatchError(f"{flag} {out} exists; pass --overwrite to replace it, or choose another file")
        have = _results_kind(out)
        if have is None or (kind is not None and have != kind):
            what = f"{with_article(kind)} results file" if kind else "a results file"
            raise SafetyPatchError(f"{flag} {out} exists and is not {what} written by safety-patch"
                                   f"{f' (its kind is {have})' if have else ''}; refusing to replace it")
    CHECKED.append(out)
    return out


# ----------------------------------------------------------------------------- claims

_HELD: dict[str, list] = {}  # lock path -> [fd, depth]: a claim is re-entrant within a process
_HELD_LOCK = threading.Lock()


def lock_path(out: str | Path) -> Path:
    """The lock file of ``out``: ``.<name>.lock`` next to it (its parent exists once checked)."""
    real = Path(out).resolve()
    return real.parent / f".{real.name}.lock"


@contextlib.contextmanager
def claim_output(out: str | Path, wait: bool = False) -> Iterator[Path]:
    """Hold an exclusive claim on output ``out`` for the block (``flock`` on ``.<name>.lock``).

    A second process claiming the same ``out`` gets ``SafetyPatchError`` naming the holder's
    pid, or with ``wait=True`` blocks until it is done (caches). The kernel drops a flock when
    its process dies, so a killed run never leaves a claim that blocks the next one. The lock
    file is removed on release; a claimant that opened it just before must see the same inode
    at the path after locking, else it retries on the new file.
    """
    try:
        import fcntl
    except ImportError:  # no flock (Windows): no claim, as before
        yield Path(out)
        return
    lock = lock_path(out)
    key = str(lock)
    with _HELD_LOCK:
        if key in _HELD:
            _HELD[key][1] += 1
            held = True
        else:
            held = False
    if held:
        try:
            yield Path(out)
        finally:
            with _HELD_LOCK:
                _HELD[key][1] -= 1
        return
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SafetyPatchError(f"cannot create {lock.parent} for {out} ({e.strerror or e})") from None
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            raise SafetyPatchError(f"cannot write {out}: cannot create lock file {lock} ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise SafetyPatchError(f"another run is writing {out} (pid {pid}); wait for it or choose another --out") from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the previous holder removed the file we locked: lock the current one
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    with _HELD_LOCK:
        _HELD[key] = [fd, 1]
    try:
        yield Path(out)
    finally:
        with _HELD_LOCK:
            del _HELD[key]
        with contextlib.suppress(OSError):
            os.unlink(lock)  # while still holding it: see the inode check above
        os.close(fd)


def holds_claim(out: str | Path) -> bool:
    """True when this process holds the claim on ``out``."""
    with _HELD_LOCK:
        return str(lock_path(out)) in _HELD


def claims_output(arg: str = "out"):
    """Decorator: run the function while holding :func:`claim_output` on its ``arg`` argument."""
    import functools
    import inspect

    def deco(fn):
        sig = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            if int(os.environ.get("RANK", "0")) != 0:  # under accelerate/torchrun rank 0 owns the output
                return fn(*args, **kwargs)
            target = sig.bind(*args, **kwargs).arguments[arg]
            with claim_output(target):
                return fn(*args, **kwargs)

        return wrapper

    return deco
