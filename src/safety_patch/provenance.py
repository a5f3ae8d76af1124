"""What made an artifact: the project's own code identity and the library versions.

Every artifact (``patch.json``, results JSON, ``run.json``, ``reproduce`` stage keys) carries
``code_identity()``:

* ``source_sha256``: a hash of every file of the installed ``safety_patch`` package (Python
  sources and resources), in path order. It is what stage keys use, because it changes with
  *any* edit, committed or not, and is computable outside a git checkout (an installed wheel).
* ``git_commit`` / ``git_dirty``: the checkout's commit and whether the package's sources
  differ from it, when the package lives in a git checkout (``None`` otherwise).

Stage keys take the whole package's hash rather than the import closure of each stage:
imports here are lazy (inside functions), so a closure computed from ``sys.modules`` would
miss code a stage runs later. Re-running too much after an edit is safe; reusing a stage
computed by other code is not.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import subprocess
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parent
_SUFFIXES = (".py", ".json", ".jsonl", ".tsv", ".yaml", ".yml", ".txt")


def source_sha256(root: Path = PACKAGE_ROOT) -> str:
    """sha256 (hex) over the relative path and bytes of every source/resource file under ``root``."""
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in _SUFFIXES
                    and "__pycache__" not in p.parts):
        h.update(f.relative_to(root).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()


def _git(root: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


@functools.lru_cache(maxsize=4)
def _code_identity(root: Path) -> dict:
    commit = _git(root, "rev-parse", "HEAD")
    dirty = None
    if commit:
        status = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ".")
        dirty = bool(status) if status is not None else None
    from . import __version__

    return {"source_sha256": source_sha256(root), "git_commit": commit, "git_dirty": dirty,
            "version": __version__}


def code_identity(root: Path = PACKAGE_ROOT) -> dict:
    """``{"source_sha256", "git_commit", "git_dirty", "version"}`` of the running package (cached per process)."""
    return dict(_code_identity(Path(root)))


def code_key() -> str:
    """The short code identity used inside stage keys: the first 16 hex digits of ``source_sha256``."""
    return code_identity()["source_sha256"][:16]


def library_versions() -> dict:
    """Versions of the libraries that decide numbers (torch, transformers, peft, trl, python), the
    number of CPU threads torch computes with (``torch_threads``: it sets the order of each
    reduction, so the last digits; a gate's AUROC bound moved in the third decimal between 1 and 2)
    and the memory allocator in use (allocator.describe)."""
    import peft
    import torch
    import transformers

    try:
        import trl

        trl_version = trl.__version__
    except ImportError:  # trl is a dependency, but a results file should never fail on it
        trl_version = None
    from . import __version__
    from .allocator import describe

    # the allocator changes no number, only memory and time: recorded so that cost figures can be read
    return {"safety_patch": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "trl": trl_version, "python": platform.python_version(),
            "torch_threads": torch.get_num_threads(), "allocator": describe()}


def provenance() -> dict:
    """``{"code": code_identity(), "versions": library_versions()}``: the block every results JSON carries."""
    return {"code": code_identity(), "versions": library_versions()}
