"""User files: JSONL or CSV with a ``prompt`` (or ``goal``) column; optional ``category``, ``response``."""

from __future__ import annotations

import csv
import hashlib
import io
from pathlib import Path

from ...errors import SafetyPatchError
from ...jsonl import iter_jsonl, json_type, read_text
from ...textsim import normalise
from ..records import USER_LICENSE, Request, SourceInfo
from ..refusals import unified_category

PROMPT_KEYS = ("prompt", "goal")


def _lf(text: str) -> str:
    """Line breaks as LF: a spreadsheet's quoted multi-line cell keeps its CRLF through the csv
    module, and the same prompt would then tokenise, hash and match the training pool differently."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _row_to_request(row: dict, where: str, source: str) -> Request:
    # A JSONL row's typed fields: a list or number must not turn into its str() (an id "[1, 2]",
    # a category "5") or quietly vanish (a non-string response replaced by a composed refusal).
    # An integer id is fine: "7" means what 7 did.
    for k in PROMPT_KEYS + ("category", "behavior_id", "response"):
        v = row.get(k)
        if v is not None and not isinstance(v, str) and not (k == "behavior_id" and type(v) is int):
            raise SafetyPatchError(f"{where}: '{k}' must be a string, got {json_type(v)}")
    key = next((k for k in PROMPT_KEYS if isinstance(row.get(k), str) and row[k].strip()), None)
    if key is None:
        given = next((k for k in PROMPT_KEYS if isinstance(row.get(k), str)), None)
        raise SafetyPatchError(f"{where}: field '{given}' is empty" if given else
                               f"{where}: missing field 'prompt' (or 'goal')")
    text = _lf(row[key].strip())
    cat = (row.get("category") or "").strip()  # "": the row names none (a CSV's empty cell, a JSONL row without it)
    bid = str(row.get("behavior_id") or f"user-{hashlib.sha256(normalise(text).encode()).hexdigest()[:12]}")
    resp = _lf(row["response"]) if isinstance(row.get("response"), str) and row["response"].strip() else None
    return Request(text, source, bid, unified_category(cat), cat, USER_LICENSE, resp)


def _csv_rows(path: Path) -> list[tuple[str, dict]]:
    """(``file:line``, row) for every record of a CSV file with a header; line = where the record starts.

    ``strict=True``: a quote left open (``"How to forge...`` and no closing quote) is an error
    naming the line it opened on; the default reader silently swallows every later line into
    that one field. A record with more fields than the header is an error too (DictReader would
    file them under ``None`` and drop them).
    """
    rows: list[tuple[str, dict]] = []
    with io.StringIO(read_text(path), newline="") as f:  # UTF-8, a spreadsheet's byte-order mark dropped
        reader = csv.reader(f, strict=True)
        start = 1
        try:
            header = next(reader, None)
            if not header:
                raise SafetyPatchError(f"{path}: empty file (no header row with a 'prompt' or 'goal' column)")
            if not set(PROMPT_KEYS) & {h.strip() for h in header}:
                near = [h.strip() for h in header if h.strip().lower() in PROMPT_KEYS]
                hint = f" (column names are case-sensitive: {near[0]!r} is not 'prompt')" if near else ""
                raise SafetyPatchError(f"{path}:1: header has no 'prompt' or 'goal' column{hint}")
            keys = [h.strip() for h in header]
            twice = sorted({k for k in keys if k and keys.count(k) > 1})
            if twice:  # a dict keeps the last column of that name: the first would vanish unread
                raise SafetyPatchError(f"{path}:1: header names column {twice[0]!r} twice")
            start = reader.line_num + 1
            for rec in reader:
                where = f"{path}:{start}"
                start = reader.line_num + 1
                if not rec:  # a blank line
                    continue
                if len(rec) > len(keys):
                    raise SafetyPatchError(f"{where}: {len(rec)} fields, but the header has {len(keys)}")
                rows.append((where, {k: v for k, v in zip(keys, rec, strict=False) if k}))
        except csv.Error as e:
            msg = str(e)
            if "unexpected end of data" in msg:
                msg = "unterminated quoted field"
            elif "expected after" in msg:  # csv's "',' expected after '\"'": a quote closed mid-field
                msg = ("text after a closing quote: a quote left open on an earlier line, or a '\"' inside a field "
                       "(write it as '\"\"')")
            elif "new-line character seen in unquoted field" in msg:
                msg = "a line break inside an unquoted field"
            raise SafetyPatchError(f"{path}:{start}: {msg}") from None
    return rows


def read_prompt_rows(path: str | Path) -> list[tuple[str, dict]]:
    """(``file:line``, row) for every row of a JSONL or CSV file; errors name file and line."""
    path = Path(path)
    if path.is_dir():
        raise SafetyPatchError(f"{path} is a folder; give a .jsonl or .csv prompt file")
    if not path.is_file():
        raise SafetyPatchError(f"prompt file not found: {path}")
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = [(f"{path}:{n}", obj) for n, obj in iter_jsonl(path)]
    elif path.suffix.lower() == ".csv":
        rows = _csv_rows(path)
    else:
        raise SafetyPatchError(f"{path}: unsupported file type {path.suffix!r}; use .jsonl or .csv")
    if not rows:
        raise SafetyPatchError(f"{path}: no rows")
    return rows


def check_responses(pairs: list[tuple[str, str]]) -> None:
    """Each (``file:line``, response) a user file brings must read as a refusal to the `refusal`
    judge (judges/refusal.py), since it becomes that row's training answer word for word (and
    DPO's "chosen" one). Public safety sets often ship the *harmful* answer in a ``response``
    column (prompt/response pairs); a patch trained on those would learn to comply. Raises
    SafetyPatchError naming the first line that does not, with the judge's P(refusal)."""
    if not pairs:
        return
    from ...judges.refusal import RefusalJudge

    verdicts = RefusalJudge().judge([""] * len(pairs), [r for _, r in pairs])
    bad = [(w, v) for (w, _), v in zip(pairs, verdicts, strict=True) if v.label != "refusal"]
    if bad:
        where, v = bad[0]
        raise SafetyPatchError(
            f"{where}: 'response' is not a refusal ({v.label}: {v.reason}; {len(bad)} of {len(pairs)} responses in "
            "the file): it would be the training answer word for word. Drop the 'response' column to have "
            "refusals composed, or give refusals there")


def load_user_file(path: str, max_items: int | None = None, name: str | None = None, for_training: bool = True):
    """(requests, SourceInfo) of a user JSONL/CSV; ``name``: the source name its requests carry
    (default ``file:`` + its file name). ``for_training``: its ``response`` column becomes training
    answers, so each must read as a refusal (``check_responses``); an evaluation reads only the
    prompts and ignores the column (public sets ship the harmful answer there; a user's trial had
    `eval safety` refuse one in words about training). Raises SafetyPatchError naming file and line."""
    name = name or f"file:{Path(path).name}"
    rows = read_prompt_rows(path)
    out = [_row_to_request(r, where, name) for where, r in rows]
    if for_training:
        check_responses([(where, q.response) for (where, _), q in zip(rows, out, strict=True) if q.response])
    info = SourceInfo(name, USER_LICENSE, "", str(Path(path).resolve()))
    return out[:max_items] if max_items else out, info
