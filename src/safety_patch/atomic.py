"""Atomic writes: an artifact is either absent or complete, never half-written.

Files are written to a temporary sibling and renamed; directories are built in a
temporary sibling directory and renamed into place. A killed process leaves only a
``.tmp-*`` sibling, which no loader ever reads (and the next writer of that name removes).

Replacing an existing folder (``overwrite=True``) swaps the two folders in one system call,
Linux ``renameat2(RENAME_EXCHANGE)``, so at every instant the final path holds either the old
or the new folder, whenever the process is killed. Where that call is missing (other
systems, old kernels, filesystems without it) we fall back to two renames (final ->
``.old-<name>.<pid>``, temporary -> final); a kill between them leaves the final path
missing for a moment, and the next ``atomic_dir`` on that path (under its claim) renames the
orphaned ``.old-*`` folder back before doing anything else.

Temporary files and folders are created private (``mkstemp``/``mkdtemp``: 0600/0700) and
given the mode a plain ``open``/``mkdir`` would have under the process umask just before they
are published, so artifacts are shared exactly as the user's umask says.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import SafetyPatchError

log = logging.getLogger(__name__)

_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process umask, read without changing it where Linux exposes it (/proc), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:
        old = os.umask(0o022)
        os.umask(old)
    return old


def file_mode() -> int:
    """Mode of a new file under the umask (0644 under umask 022)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Mode of a new folder under the umask (0755 under umask 022)."""
    return 0o777 & ~current_umask()


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """``renameat2(src, dst, flags)``; False where the call or the flag is unsupported here.

    Raises ``OSError`` for real failures (e.g. EEXIST under RENAME_NOREPLACE)."""
    import ctypes

    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(src), None, str(dst))


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with FileExistsError if ``dst`` exists (even if it appeared just now)."""
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
    except FileExistsError:
        raise
    except OSError as e:
        if e.errno == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, "File exists", str(dst)) from None
        raise
    if dst.exists() or dst.is_symlink():  # fallback: a check, then a plain rename (no atomic guarantee)
        raise FileExistsError(errno.EEXIST, "File exists", str(dst))
    os.rename(src, dst)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file, read in chunks (weights can be many GB)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temporary sibling, fsync, rename).

    Raises ``SafetyPatchError`` (one line) when the folder cannot be created or written."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}.", dir=path.parent)
    except OSError as e:
        raise SafetyPatchError(f"cannot write {path} ({e.strerror or e})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), file_mode())  # mkstemp made it 0600
            os.fsync(f.fileno())
        if path.is_dir():
            raise SafetyPatchError(f"cannot write {path}: it is a directory")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_json(path: str | Path, obj: Any) -> Path:
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n")


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def _stale_siblings(final: Path, prefix: str) -> list[Path]:
    """``.tmp-<name>.XXXXXXXX`` / ``.old-<name>.<pid>`` siblings left by killed writers of ``final``."""
    pat = re.compile(re.escape(f"{prefix}{final.name}.") + (r"[a-z0-9_]{8}$" if prefix == ".tmp-" else r"[0-9]+$"))
    try:
        return [p for p in final.parent.iterdir() if pat.match(p.name)]
    except OSError:
        return []


def interrupted_note(final: str | Path) -> str:
    """``""`` unless ``final`` is missing because a writer was killed between the two renames of
    the fallback swap (systems without ``renameat2``): then a note, starting with a space, naming
    the ``.old-<name>.<pid>`` folder that holds its previous contents. For "not found" errors."""
    final = Path(final)
    if final.exists():
        return ""
    olds = _stale_siblings(final, ".old-")
    if not olds:
        return ""
    return (f" (an interrupted --overwrite left its previous contents in {olds[0]}: the next command that "
            f"writes {final} restores them, or rename that folder back)")


def recover(final: str | Path) -> None:
    """Undo what a killed writer of ``final`` left: restore an orphaned ``.old-<name>.*`` when
    ``final`` is missing (the two-rename fallback killed between its renames), and remove stale
    ``.tmp-<name>.*`` and ``.old-<name>.*`` siblings. Call only while holding ``final``'s claim
    (outputs.claim_output), so no live writer's temporary folder is touched."""
    final = Path(final)
    olds = sorted(_stale_siblings(final, ".old-"), key=lambda p: p.stat().st_mtime)
    if olds and not final.exists():
        os.rename(olds.pop(), final)
        log.warning("restored %s from an interrupted --overwrite", final)
    for p in olds + _stale_siblings(final, ".tmp-"):
        shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def _publish_modes(root: Path) -> None:
    """Give ``root`` and everything in it the mode a plain mkdir/open gives under the umask.

    mkdtemp makes ``root`` 0700, and some writers (safetensors' ``save_file``) create 0600
    files; artifacts should be as readable as any other file the user creates (a vLLM server
    running as another user reads patches and merged models)."""
    fmode, dmode = file_mode(), dir_mode()
    os.chmod(root, dmode)
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            p = os.path.join(dirpath, d)
            if not os.path.islink(p):
                os.chmod(p, dmode)
        for f in filenames:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                os.chmod(p, dmode if os.stat(p).st_mode & 0o111 else fmode)


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Put folder ``tmp`` at ``final``, replacing the folder there; see the module docstring."""
    if _renameat2(tmp, final, _RENAME_EXCHANGE):  # tmp now holds the old folder
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = final.with_name(f".old-{final.name}.{os.getpid()}")
    os.rename(final, old)
    os.rename(tmp, final)  # killed before this line: recover() restores `old` on the next run
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(final: str | Path, overwrite: bool = False, kind: str | None = None,
               claim: bool = True) -> Iterator[Path]:
    """Yield a temporary directory that becomes ``final`` only if the block succeeds.

    ``final`` may already exist only as an empty folder, or with ``overwrite`` (and, when
    ``kind`` names a kind in ``outputs.MARKERS``, only as a folder of that kind: we never replace
    a folder we did not write). ``claim``: hold ``outputs.claim_output(final)`` throughout (a
    second writer fails at once) and clean up after killed writers first.
    Raises ``SafetyPatchError`` for an unusable path or a folder that appeared meanwhile.
    """
    from .outputs import MARKERS, claim_output, looks_like, with_article

    final = Path(final)
    with claim_output(final) if claim else contextlib.nullcontext():
        if claim:
            recover(final)

        def check_replaceable() -> bool:
            """True when ``final`` holds something to replace; raises when we may not replace it."""
            if not (final.exists() or final.is_symlink()):
                return False
            if not final.is_dir() or final.is_symlink():
                raise SafetyPatchError(f"{final} exists and is not a folder; refusing to replace it")
            if not any(final.iterdir()):
                return True
            if not overwrite:
                raise SafetyPatchError(f"{final} exists (did another run write it meanwhile?); nothing was replaced "
                                       "(pass --overwrite to replace it)")
            if kind is not None and not looks_like(final, kind):
                raise SafetyPatchError(f"{final} is not {with_article(kind)} folder written by safety-patch (no "
                                       f"{MARKERS[kind][0]}); refusing to replace it")
            return True

        check_replaceable()  # before the work, not after it
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}.", dir=final.parent))
        except OSError as e:
            raise SafetyPatchError(f"cannot write {final} ({e.strerror or e})") from None
        try:
            yield tmp
            _publish_modes(tmp)
            if check_replaceable():
                _swap_into_place(tmp, final)
            else:
                try:
                    _rename_noreplace(tmp, final)
                except FileExistsError:
                    raise SafetyPatchError(f"{final} appeared while writing it (another run?); nothing was "
                                           "replaced") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
