"""Where evaluation prompts come from: a data folder's held-out splits or a user file."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..errors import SafetyPatchError


def source_identity(source: str | Path | None) -> dict | None:
    """What an evaluation read, so that its results name their inputs by content, not by path alone:
    ``{"path", "kind": "data-folder", "manifest_sha256", "files_changed"}`` for a data folder (its
    manifest holds every file's hash; ``files_changed`` lists the files that no longer match it, with
    their sha256, and each is warned of on stderr), ``{"path", "kind": "file", "sha256"}`` for a prompt
    file, None for none."""
    if source is None:
        return None
    p = Path(source)
    if p.is_dir():
        from ..data.build import manifest_sha256
        from ..data.folder import DataFolder

        # Derived folders edit files on purpose, so an edit is recorded and said, not refused; the
        # manifest's hash alone would name the folder as built, not as read.
        changed = DataFolder(p).changed()
        for f, sha in changed.items():
            print(f"[data] {p / f}: " + (f"differs from {p / 'manifest.json'} (edited after `data build`); its sha256 "
                                         "is recorded in the results" if sha else "missing, though the manifest lists it"),
                  file=sys.stderr, flush=True)
        return {"path": str(p), "kind": "data-folder", "manifest_sha256": manifest_sha256(p), "files_changed": changed}
    from ..atomic import sha256_file

    return {"path": str(p), "kind": "file", "sha256": sha256_file(p)}


NO_CATEGORY = "(no category)"
"""How ``per_user_category`` names the rows of a prompt file that give no ``category`` where others do."""


def harmful_requests(source: str | Path, split: str = "test", limit: int | None = None) -> tuple[list[dict], list]:
    """Unique held-out behaviours (request, category, behavior_id) and the split's templates.

    ``source`` is a data folder (its ``{split}.jsonl`` and the ``templates.jsonl`` families of
    that split) or a JSONL/CSV file with a ``prompt`` or ``goal`` column (AdvBench's CSV works
    as is; its templates are the default held-out set).
    """
    from ..data.folder import HARMFUL, DataFolder

    p = Path(source)
    if p.is_dir():
        if split not in HARMFUL:
            raise SafetyPatchError(f"unknown split {split!r}; valid: {', '.join(HARMFUL)}")
        d = DataFolder(p)
        if not d.has(split):
            raise SafetyPatchError(f"{p} has no {split}.jsonl; pass a data folder from `data build` or a prompt file")
        reqs = d.behaviours(split)
        templates = d.templates(split)
    else:
        from ..data.sources.files import load_user_file

        items, _ = load_user_file(str(p), for_training=False)  # a `response` column is not read
        # The file's own categories, for `per_user_category`; a row without one is grouped under
        # NO_CATEGORY, not under a "harmful" the file never wrote. A file that names none has no such table.
        named = any(r.raw_category for r in items)
        reqs = _unique([{"request": r.text, "category": r.category, "behavior_id": r.behavior_id, "source": r.source}
                        | ({"raw_category": r.raw_category or NO_CATEGORY} if named else {}) for r in items],
                       lambda r: r["request"], p)
        templates = []
    if not reqs:
        raise SafetyPatchError(f"{source}: no prompts")
    if limit:  # a fixed pseudo-random subset, so a small limit still spans the categories
        import hashlib

        reqs = sorted(reqs, key=lambda r: hashlib.sha256(r["behavior_id"].encode()).hexdigest())[:limit]
    return reqs, templates


def _unique(items: list[dict], key, path) -> list[dict]:
    """``items`` without exact repeats (the first kept; a repeat would count one prompt twice in every
    rate's n); says on stderr how many were dropped."""
    seen, out = set(), []
    for it in items:
        k = key(it)
        if k not in seen:
            seen.add(k)
            out.append(it)
    if len(out) < len(items):
        print(f"[prompts] {path}: {len(items) - len(out)} repeated prompts dropped ({len(out)} unique)",
              file=sys.stderr, flush=True)
    return out


def _conversation_row(r: dict, where: str) -> list[dict] | None:
    """A row in the data folder's own form (``{"messages": [...]}``, e.g. a copy of general.jsonl) as the
    conversation up to its last user turn (a distilled answer after it is dropped); None without
    ``messages``. Raises SafetyPatchError naming ``where`` for messages that hold no user turn."""
    msgs = r.get("messages")
    if msgs is None:
        return None
    ok = isinstance(msgs, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                        and isinstance(m.get("content"), str) for m in msgs)
    last = max((i for i, m in enumerate(msgs) if m.get("role") == "user"), default=None) if ok else None
    if last is None:
        raise SafetyPatchError(f"{where}: field 'messages' must be a list of {{role, content}} with a user turn")
    return [{"role": m["role"], "content": m["content"]} for m in msgs[:last + 1]]


def benign_prompts(source: str | Path, split: str = "test", limit: int | None = None) -> list[dict]:
    """Borderline-benign and general prompts (held-out split) from a data folder, or a user file."""
    p = Path(source)
    out = []
    if p.is_dir():
        from ..data.folder import BENIGN, DataFolder

        d = DataFolder(p)
        for kind in BENIGN:
            if not d.has(kind):
                raise SafetyPatchError(f"{p} has no {d.file(kind).name}")
            # the conversation without its distilled answer; meta.category is required by the row schema
            out += [{"messages": msgs, "category": r["meta"]["category"], "set": kind}
                    for msgs, r in zip(d.prompts(kind, split), d.in_split(kind, split), strict=True)]
    else:
        from ..data.sources.files import PROMPT_KEYS, read_prompt_rows

        for where, r in read_prompt_rows(p):
            msgs = _conversation_row(r, where)
            if msgs is None:
                # the first of prompt/goal that holds text, as the harmful reader takes it (data.sources.files)
                key = next((k for k in PROMPT_KEYS if isinstance(r.get(k), str) and r[k].strip()), None)
                if key is None:
                    given = next((k for k in PROMPT_KEYS if k in r), None)
                    raise SafetyPatchError(  # a user's trial: "missing" for "" and 42
                        f"{where}: field '{given}' must be non-empty text, got {r[given]!r}" if given else
                        f"{where}: missing field 'prompt' (or 'goal', or 'messages')")
                msgs = [{"role": "user", "content": r[key].strip()}]
            cat = r.get("category") if r.get("category") is not None else (r.get("meta") or {}).get("category")
            if cat is not None and not isinstance(cat, str):  # as the harmful reader: 5 is not a category name
                raise SafetyPatchError(f"{where}: field 'category' must be a string, got {cat!r}")
            out.append({"messages": msgs, "category": cat or "user", "set": "user"})
        out = _unique(out, lambda o: json.dumps(o["messages"], ensure_ascii=False), p)
    if not out:
        raise SafetyPatchError(f"{source}: no prompts")
    if limit:  # keep both sets represented
        by = {}
        for o in out:
            by.setdefault(o["set"], []).append(o)
        out = [o for rows in by.values() for o in rows[:limit]]
    return out


def train_split_texts(folder) -> set[str]:
    """What a data folder's train split teaches, as ``textsim.normalise``d texts: each harmful row's
    bare request and last user turn (a request seen only inside a template counts), and every
    borderline and general train prompt. ``folder``: a ``DataFolder``."""
    from ..data.folder import BENIGN
    from ..textsim import normalise

    out = {normalise((r.get("meta") or {}).get("request", "")) for r in folder.in_split("train", "train")}
    out |= {normalise(c[-1]["content"]) for c in folder.prompts("train", "train")}
    for kind in BENIGN:
        if folder.has(kind):
            out |= {normalise(c[-1]["content"]) for c in folder.prompts(kind, "train")}
    return out - {normalise("")}


def training_overlap(texts: list[str], patches: list) -> dict[str, dict]:
    """Which of an evaluation's prompts (``texts``: the user turns it sends, before any attack) each
    patch was trained on: ``{patch id: {"in_training": k, "of": n, "data": dir}}``, or
    ``{"unchecked": why}`` when the patch's recorded data folder is gone or no longer the one it was
    trained on (its manifest hash). Compared after ``textsim.normalise``, against the folder's train
    split: harmful rows' requests and user turns, borderline and general prompts. A user's trial
    evaluated a patch on the very file its data was built from and read in-sample rates as held
    out. Prompts from a data folder's own val/test split never overlap it by construction; this is
    for prompt files."""
    from ..data.build import manifest_sha256
    from ..data.folder import DataFolder
    from ..textsim import normalise

    want = [normalise(t) for t in texts]
    out: dict[str, dict] = {}
    for p in patches:
        rec = p.meta.get("data") or {}
        d = Path(rec.get("dir", ""))
        if not rec.get("dir") or not (d / "manifest.json").is_file():
            # Patches written before 2026-12-05 record the folder as `train` was given it: relative
            # to the folder it ran from, which this process may not share.
            rel = rec.get("dir") and not d.is_absolute()
            out[p.id] = {"unchecked": f"its training data folder {rec.get('dir')!r} is not here"
                         + (" (recorded relative to the folder the patch was trained from)" if rel else "")}
            continue
        if rec.get("manifest_sha256") and manifest_sha256(d) != rec["manifest_sha256"]:
            out[p.id] = {"unchecked": f"{d} is no longer the data folder it was trained on (manifest changed)"}
            continue
        seen = train_split_texts(DataFolder(d))
        k = sum(w in seen for w in want)
        out[p.id] = {"in_training": k, "of": len(want), "data": str(d)}
        if k:
            print(f"[prompts] warning: {k} of {len(want)} prompts are in the train split patch {p.path} was trained "
                  f"on ({d}): on those its rates are in-sample, not held out", file=sys.stderr, flush=True)
    return out

