"""The data folder: one reader, validated once, used by every stage that reads one.

A data folder is what ``data build`` writes (docs/data.md): the JSONL files named in
``FILES`` and a ``manifest.json``. ``DataFolder(path)`` checks the manifest when it is made
(a JSON object with the fields and types in ``Manifest``); each file is read and every row
checked against its schema (``ROW_SCHEMAS``) once, on first use. Rows come back as the very
dicts parsed from the file, so a valid folder reads exactly as it did before there was a
reader. Every error is one ``SafetyPatchError`` line naming file, line and field, e.g.
``data/train.jsonl:7: messages[1].content must be a string, got integer``.

Schemas require what the readers rely on and type what may be there: a field the build
writes but nobody reads may be missing; a field that is present must have its type. Extra
fields are allowed (they are carried along, never read). File hashes in the manifest are not
checked on read: derived folders (``redteam`` rounds, the reproduce cross-domain arm) and
tests edit files on purpose; ``DataFolder.verify`` checks them on request.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal, NotRequired

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, with_config
from typing_extensions import TypedDict

from ..errors import SafetyPatchError, field_path
from ..jsonl import iter_jsonl, json_type, loads_strict, read_text

FILES: dict[str, str] = {
    "train": "train.jsonl",
    "val": "val.jsonl",
    "test": "test.jsonl",
    "general": "general.jsonl",
    "borderline": "borderline.jsonl",
    "templates": "templates.jsonl",
    "humaneval": "humaneval.jsonl",
    "dpo": "dpo.jsonl",
    "selfinstruct": "selfinstruct.jsonl",
}
"""Every file a data folder may hold, by the key the accessors take."""
ALWAYS = ("train", "val", "test", "general", "borderline", "templates", "humaneval")
"""The files every build writes (``dpo`` and ``selfinstruct`` only when asked for)."""
MANIFEST = "manifest.json"
KIND = "safety-patch/data"
HARMFUL = ("train", "val", "test")
"""Files of harmful requests with refusals, one per split."""
BENIGN = ("borderline", "general")
"""Files of safe prompts, each row tagged with its split in ``meta.split``."""

Split = Literal["train", "val", "test"]
_STRICT = ConfigDict(strict=True, allow_inf_nan=False)  # no "1" for 1, no NaN: a value means what it says


# ----------------------------------------------------------------------------- row schemas


@with_config(_STRICT)
class Message(TypedDict):
    role: str
    content: str


Messages = Annotated[list[Message], Field(min_length=1)]


@with_config(_STRICT)
class HarmfulMeta(TypedDict):
    """A harmful row's meta as evaluation reads it (val/test; train rows when a round attacks them)."""

    source: str
    category: str
    behavior_id: str
    template: str
    template_family: str
    split: Split
    request: str
    raw_category: NotRequired[str]
    """A user file's own category where it is not one of the unified ones (``category`` holds
    the unified one, which picks refusals and stratifies splits)."""


@with_config(_STRICT)
class TrainMeta(TypedDict):
    """train.jsonl's meta: training reads only the messages, so derived folders (the cross-domain
    arm's general rows) may leave fields out; what is there is typed."""

    source: NotRequired[str]
    category: NotRequired[str]
    behavior_id: NotRequired[str]
    template: NotRequired[str]
    template_family: NotRequired[str]
    split: NotRequired[Split]
    request: NotRequired[str]
    raw_category: NotRequired[str]
    distilled: NotRequired[bool]
    prefill: NotRequired[str]
    """Text the attack forced at the start of the answer (the prefill attack): the assistant turn
    starts with it, and training takes no loss on it, only on what follows (``train.data``)."""


@with_config(_STRICT)
class BenignMeta(TypedDict):
    source: NotRequired[str]
    category: str
    split: Split
    request: NotRequired[str]
    raw_category: NotRequired[str]
    distilled: NotRequired[bool]


@with_config(_STRICT)
class SelfInstructMeta(TypedDict):
    source: NotRequired[str]
    category: NotRequired[str]
    split: NotRequired[Split]
    distilled: NotRequired[bool]


@with_config(_STRICT)
class HarmfulRow(TypedDict):
    messages: Messages
    meta: HarmfulMeta


@with_config(_STRICT)
class TrainRow(TypedDict):
    messages: Messages
    meta: NotRequired[TrainMeta]


@with_config(_STRICT)
class BenignRow(TypedDict):
    messages: Messages
    meta: BenignMeta


@with_config(_STRICT)
class SelfInstructRow(TypedDict):
    messages: Messages
    meta: NotRequired[SelfInstructMeta]


@with_config(_STRICT)
class TemplateRow(TypedDict):
    id: str
    family: str
    source: str
    split: Split
    text: str


@with_config(_STRICT)
class HumanEvalRow(TypedDict):
    task_id: str
    prompt: str
    entry_point: str
    test: str
    canonical_solution: NotRequired[str]


@with_config(_STRICT)
class DpoRow(TypedDict):
    prompt: Messages
    chosen: Messages
    rejected: Messages
    meta: NotRequired[dict[str, Any]]


ROW_SCHEMAS: dict[str, type] = {
    "train": TrainRow, "val": HarmfulRow, "test": HarmfulRow, "general": BenignRow, "borderline": BenignRow,
    "templates": TemplateRow, "humaneval": HumanEvalRow, "dpo": DpoRow, "selfinstruct": SelfInstructRow,
}


# ----------------------------------------------------------------------------- manifest schema


@with_config(_STRICT)
class SelfInstructCounts(TypedDict):
    sampled: int
    kept: int
    unfinished: int
    harm_terms: int
    near_duplicate: int
    near_eval: int


@with_config(_STRICT)
class ExtraCounts(TypedDict):
    written: int
    near_eval: int
    kept: int


PerSplit = dict[str, int]


@with_config(_STRICT)
class Counts(TypedDict):
    """The counts ``data show`` prints."""

    harmful_requests: int
    behaviours_per_split: PerSplit
    rows_per_split: PerSplit
    wrapped_train_rows: int
    category_per_split: dict[str, PerSplit]
    behaviours_by_source_per_split: NotRequired[dict[str, PerSplit]]  # since 2026-12-05
    template_families_per_split: PerSplit
    templates_per_split: PerSplit
    general_per_split: PerSplit
    borderline_per_split: PerSplit
    humaneval_tasks: int
    dpo_pairs: int
    refusal_phrasings: int
    self_instruct: NotRequired[SelfInstructCounts | None]
    borderline_train_extra: NotRequired[ExtraCounts | None]


@with_config(_STRICT)
class SourceEntry(TypedDict):
    name: str
    license: NotRequired[str]
    kept: NotRequired[int]


@with_config(_STRICT)
class ManifestConfig(TypedDict):
    sources: list[str]


@with_config(_STRICT)
class Manifest(TypedDict):
    kind: str
    seed: int
    config: ManifestConfig
    sources: list[SourceEntry]
    counts: Counts
    files: dict[str, str]
    seconds: float
    safety_patch_version: NotRequired[str]
    distillation: NotRequired[dict[str, Any] | None]
    derived: NotRequired[dict[str, Any]]


# ----------------------------------------------------------------------------- errors


@cache
def _adapter(schema: type) -> TypeAdapter:
    return TypeAdapter(schema)


def describe(e: ValidationError) -> str:
    """The first problem of a pydantic error as ``field must be ..., got ...`` (one line)."""
    err = e.errors()[0]
    where, got, kind = field_path(err["loc"]), json_type(err.get("input")), err["type"]
    if kind == "missing":
        return f"missing field '{where}'"
    need = {"string_type": "a string", "int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
            "list_type": "a list", "dict_type": "an object", "finite_number": "a finite number"}.get(kind)
    if need:
        return f"{where or 'row'} must be {need}, got {got}"
    if kind == "literal_error":
        return f"{where} must be {err['ctx']['expected']}, got {err['input']!r}"
    if kind == "too_short":
        return f"{where} must not be empty"
    return f"{where}: {err['msg']}"


def check(schema: type, obj: Any, where: str) -> None:
    """Raise ``SafetyPatchError("{where}: {problem}")`` unless ``obj`` fits ``schema``."""
    try:
        _adapter(schema).validate_python(obj)
    except ValidationError as e:
        raise SafetyPatchError(f"{where}: {describe(e)}") from None


# ----------------------------------------------------------------------------- the reader


class DataFolder:
    """A data folder whose manifest has been checked; rows are read and checked lazily, once per file.

    ``path``: the folder; ``manifest``: the parsed ``manifest.json``. Accessors take the keys
    of ``FILES`` ("train", "general", ...). Every error is a ``SafetyPatchError`` naming the
    file (and line and field where there is one).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        p = self.path / MANIFEST
        if not self.path.exists():
            from ..atomic import interrupted_note

            raise SafetyPatchError(f"{self.path} does not exist (a data folder from `safety-patch data build` was expected)"
                                   + interrupted_note(self.path))
        if not p.is_file():
            # a red-team round's folder holds its data in data/, a reproduce run in 01-data/: name it
            # (a user's trial passed the round's folder and was told to run `data build`)
            inner = next((self.path / n for n in ("data", "01-data") if (self.path / n / MANIFEST).is_file()), None)
            raise SafetyPatchError(f"{self.path} is not a data folder (no {MANIFEST}); " + (
                f"it holds one: {inner}" if inner else "run `safety-patch data build` first"))
        m = loads_strict(read_text(p), str(p))
        if not isinstance(m, dict):
            raise SafetyPatchError(f"{p}: expected a JSON object, got {json_type(m)}")
        if m.get("kind") != KIND:
            raise SafetyPatchError(f"{p}: not a safety-patch data manifest (kind must be {KIND!r})")
        check(Manifest, m, str(p))
        self.manifest: dict = m
        self._rows: dict[str, list[tuple[int, dict]]] = {}

    @classmethod
    def of(cls, folder: str | Path | DataFolder) -> DataFolder:
        """``folder`` itself if it is a ``DataFolder`` (already checked), else the folder at that path."""
        return folder if isinstance(folder, DataFolder) else cls(folder)

    def __repr__(self) -> str:
        return f"DataFolder({str(self.path)!r})"

    def file(self, name: str) -> Path:
        if name not in FILES:
            raise KeyError(f"unknown data file {name!r}; valid: {', '.join(FILES)}")  # a bug, not a user error
        return self.path / FILES[name]

    def has(self, name: str) -> bool:
        return self.file(name).is_file()

    def numbered(self, name: str) -> list[tuple[int, dict]]:
        """(line number, row) for every row of one file, each checked against ``ROW_SCHEMAS[name]``.

        Raises ``SafetyPatchError`` if the file is missing, unreadable, or any row is malformed.
        """
        if name not in self._rows:
            path = self.file(name)
            if not path.is_file():
                raise SafetyPatchError(f"{path} not found; rebuild the data folder with `safety-patch data build`")
            rows = list(iter_jsonl(path))
            for n, r in rows:
                check(ROW_SCHEMAS[name], r, f"{path}:{n}")
            self._rows[name] = rows
        return self._rows[name]

    def rows(self, name: str) -> list[dict]:
        """Every row of one file (see ``numbered``)."""
        return [r for _, r in self.numbered(name)]

    def nonempty(self, name: str) -> list[dict]:
        """``rows(name)``, or a ``SafetyPatchError`` when the file has none."""
        rows = self.rows(name)
        if not rows:
            raise SafetyPatchError(f"{self.file(name)}: no rows")
        return rows

    def where(self, name: str, line: int) -> str:
        return f"{self.file(name)}:{line}"

    def _in_split(self, name: str, split: str) -> list[tuple[int, dict]]:
        if name == "templates":
            return [(n, r) for n, r in self.numbered(name) if r["split"] == split]
        return [(n, r) for n, r in self.numbered(name) if r.get("meta", {}).get("split") == split]

    def in_split(self, name: str, split: str) -> list[dict]:
        """Rows of ``split`` (``meta.split``; a template's ``split``); rows without one belong to none."""
        return [r for _, r in self._in_split(name, split)]

    def distilled_numbered(self, name: str, split: str = "train") -> list[tuple[int, dict]]:
        """(line, row) for the rows of ``split`` that end with an assistant answer (the base model's
        own, in benign files)."""
        return [(n, r) for n, r in self._in_split(name, split) if r["messages"][-1]["role"] == "assistant"]

    def distilled(self, name: str, split: str = "train") -> list[dict]:
        """The rows of ``distilled_numbered``."""
        return [r for _, r in self.distilled_numbered(name, split)]

    def prompts(self, name: str, split: str | None = None) -> list[list[dict]]:
        """Each row's conversation up to its last user turn (a trailing answer dropped), of ``split`` if
        given; a conversation that does not then end with a user turn is an error naming its line."""
        out = []
        for n, r in (self.numbered(name) if split is None else self._in_split(name, split)):
            msgs = r["messages"][:-1] if r["messages"][-1]["role"] == "assistant" else r["messages"]
            if not msgs or msgs[-1]["role"] != "user":
                raise SafetyPatchError(f"{self.where(name, n)}: expected a user turn")
            out.append(msgs)
        return out

    def behaviours(self, name: str) -> list[dict]:
        """Unique behaviours of a harmful file, first row of each: ``request``, ``category``,
        ``behavior_id``, ``source``, and ``raw_category`` where the row has one (every row's meta
        must then have all of ``HarmfulMeta``)."""
        seen: set[str] = set()
        out = []
        for n, r in self.numbered(name):
            check(HarmfulRow, r, self.where(name, n))
            m = r["meta"]
            if m["behavior_id"] not in seen:
                seen.add(m["behavior_id"])
                out.append({"request": m["request"], "category": m["category"], "behavior_id": m["behavior_id"],
                            "source": m["source"]} | ({"raw_category": m["raw_category"]} if "raw_category" in m else {}))
        return out

    def templates(self, split: str) -> list:
        """The jailbreak templates of one split as ``attacks.templates.Template`` (none without a templates file)."""
        from ..attacks.templates import PLACEHOLDER, Template

        if not self.has("templates"):
            return []
        out = []
        for n, t in self._in_split("templates", split):
            if t["text"].count(PLACEHOLDER) != 1:
                raise SafetyPatchError(f"{self.where('templates', n)}: text must contain {PLACEHOLDER} exactly once")
            out.append(Template(t["id"], t["family"], t["source"], t["text"]))
        return out

    def changed(self) -> dict[str, str | None]:
        """{file: its sha256 now, or None if missing} for the files whose sha256 differs from the manifest's."""
        from ..atomic import sha256_file

        now = {f: sha256_file(self.path / f) if (self.path / f).is_file() else None for f in self.manifest["files"]}
        return {f: sha for f, sha in now.items() if sha != self.manifest["files"][f]}

    def verify(self) -> list[str]:
        """Files whose sha256 differs from the manifest's (missing files count as different)."""
        return list(self.changed())


__all__ = ["ALWAYS", "BENIGN", "FILES", "HARMFUL", "MANIFEST", "DataFolder", "check", "describe"]
