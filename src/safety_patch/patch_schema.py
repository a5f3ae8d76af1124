"""The schema of a patch folder's metadata: ``patch.json`` and ``adapter_config.json``.

``patch.json`` is an editable text file, so nothing in it is trusted by default: every read
validates it against :class:`PatchManifest` (required fields, strict types: an ``int`` is
not a string, a string is not a list) and reports the first problem as one
``SafetyPatchError`` line naming the file and the field. Fields the tooling acts on are
required; a missing one is an error, never a default, because a default would silently
switch a check off (no ``files``: no integrity check; no ``base.fingerprint``: no base
binding; no ``gate``: an always-on adapter). Descriptive fields (training statistics,
config, costs) may be absent, but when present must have the type readers expect.

Identity is not metadata: the patch id used for caches and ``stack`` is computed from the
weight and gate files (``patch_id``); ``patch.json``'s ``id`` is kept for display and must
agree with it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from .errors import SafetyPatchError, field_path

PatchId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{16}$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
NonEmpty = Annotated[str, StringConstraints(min_length=1)]


class _Strict(BaseModel):
    # extra="allow": training writes more descriptive fields than readers need; strict: no coercion
    # (5 is not "5", "abc" is not a list of three ids).
    model_config = ConfigDict(strict=True, extra="allow")


class BaseInfo(_Strict):
    fingerprint: NonEmpty
    """sha256 of the base model's weights and tokenizer (fingerprint.py); the patch refuses other bases."""
    name: str | None = None


class GateInfo(_Strict):
    layer: int
    """Decoder layer the probe reads; must equal the one in gate.safetensors."""
    threshold: float
    """Probe logit above which the adapter applies; must equal the one in gate.safetensors."""
    extra_layers: list[int] = []
    """Further layers a multi-layer gate reads (gate.Gate.extra_layers); must equal gate.safetensors'."""


class PatchManifest(_Strict):
    kind: Literal["safety-patch/patch"]
    format: Literal["lora", "delta"]
    id: PatchId
    """Display copy of the computed id (patch_id of ``files``); a disagreeing value is an error."""
    base: BaseInfo
    stack: list[PatchId]
    """Computed ids of the patches this one was trained on top of, in attach order."""
    files: dict[str, Sha256]
    """sha256 of every weight file (and gate.safetensors for a gated patch): exactly those."""
    binding: Sha256
    """binding_digest of the fields that decide what attaching means; an edit of one of them shows."""
    gate: GateInfo | None = None
    """Present exactly when the folder holds gate.safetensors."""
    method: str | None = None
    objective: str | None = None
    config: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    training: dict[str, Any] | None = None
    created: str | None = None
    safety_patch_version: str | None = None
    record_sha256: Sha256 | None = None
    """record_digest of every other field, descriptive ones included (config, training, the gate's
    validation report): an edit of one shows. Absent in patches written before 2026-12-03."""


class AdapterConfig(BaseModel):
    """The fields of PEFT's ``adapter_config.json`` that decide which tensors a LoRA has and their shapes."""

    model_config = ConfigDict(strict=True, extra="allow")
    peft_type: Literal["LORA"]
    r: int
    lora_alpha: float
    target_modules: list[NonEmpty] | NonEmpty
    rank_pattern: dict[str, int] | None = None
    alpha_pattern: dict[str, float] | None = None
    use_dora: bool | None = False
    modules_to_save: list[str] | None = None


def _field_path(raw: Any, loc: tuple) -> str:
    """The dotted path of an invalid (present) value: ``loc`` without pydantic's union-member tags (``list[str]``)."""
    parts, node = [], raw
    for x in loc:
        if isinstance(node, dict) and x in node:
            node = node[x]
        elif isinstance(node, list) and isinstance(x, int) and 0 <= x < len(node):
            node = node[x]
        else:
            continue
        parts.append(x)
    return field_path(parts)


def first_error(where: Path | str, e: ValidationError, raw: Any) -> SafetyPatchError:
    """The one-line error for a manifest (``where``: its file) that failed validation: the first of
    ``e``'s errors, its field named as written in ``raw`` (the parsed JSON)."""
    err = e.errors()[0]
    loc = _field_path(raw, err["loc"]) if err["type"] != "missing" else field_path(err["loc"])
    if err["type"] == "missing" and loc == "binding":
        return SafetyPatchError(f"{where}: missing required field 'binding' (patch.json edited, or written by a "
                                "safety-patch before bindings were sealed: re-create the patch)")
    if err["type"] == "missing":
        return SafetyPatchError(f"{where}: missing required field '{loc}'")
    got = err.get("input")
    shown = json.dumps(got)[:60] if isinstance(got, (str, int, float, bool, list, dict, type(None))) else repr(got)[:60]
    msg = re.sub(r" or instance of \w+", "", err["msg"])  # pydantic's wording for a nested model: say "dictionary"
    return SafetyPatchError(f"{where}: field '{loc}' is invalid ({msg}; got {shown})")


def load_json_object(path: Path) -> dict:
    """The JSON object in ``path`` (UTF-8). Raises SafetyPatchError naming the file, and the line
    and column of invalid JSON, or that the file holds something other than an object."""
    from .jsonl import read_text

    try:
        raw = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise SafetyPatchError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno} ({e.msg})") from None
    if not isinstance(raw, dict):
        raise SafetyPatchError(f"{path}: must hold a JSON object, not a {type(raw).__name__}")
    return raw


def read_manifest(path: Path) -> tuple[dict, PatchManifest]:
    """Parse and validate ``patch.json``: (the raw dict, the validated manifest).

    Raises SafetyPatchError naming the file and the first invalid or missing field.
    """
    raw = load_json_object(path)
    try:
        man = PatchManifest.model_validate(raw)
    except ValidationError as e:
        raise first_error(path, e, raw) from None
    if "gate" in raw and raw["gate"] is None:
        raise SafetyPatchError(f"{path}: field 'gate' is null (a gated patch records an object; an ungated one has no 'gate')")
    if man.gate is not None and not math.isfinite(man.gate.threshold):
        raise SafetyPatchError(f"{path}: field 'gate.threshold' must be finite, got {man.gate.threshold}")
    return raw, man


def read_adapter_config(path: Path) -> AdapterConfig:
    """Parse and validate a LoRA ``adapter_config.json`` (the fields that fix tensor names and shapes)."""
    raw = load_json_object(path)
    try:
        cfg = AdapterConfig.model_validate(raw)
    except ValidationError as e:
        raise first_error(path, e, raw) from None
    if cfg.r <= 0:
        raise SafetyPatchError(f"{path}: field 'r' must be a positive rank, got {cfg.r}")
    bad = [k for k, v in (cfg.rank_pattern or {}).items() if v <= 0]
    if bad:
        raise SafetyPatchError(f"{path}: field 'rank_pattern.{bad[0]}' must be a positive rank")
    if not math.isfinite(cfg.lora_alpha):
        raise SafetyPatchError(f"{path}: field 'lora_alpha' must be finite, got {cfg.lora_alpha}")
    if cfg.use_dora:
        raise SafetyPatchError(f"{path}: field 'use_dora': DoRA adapters are not supported (plain LoRA only)")
    if cfg.modules_to_save:
        raise SafetyPatchError(f"{path}: field 'modules_to_save': full-module copies are not supported (plain LoRA only)")
    return cfg


def binding_digest(fmt: str, fingerprint: str, stack: list[str], gated: bool, files: dict[str, str]) -> str:
    """sha256 over what attaching a patch means: format, base fingerprint, prerequisites, gating, file hashes.

    Stored as ``binding`` in patch.json. It is not a signature (whoever recomputes it can
    forge it); it makes a hand edit that would change what the patch does (an emptied
    ``stack``, another fingerprint) an error instead of a silent change of meaning.
    """
    payload = {"format": fmt, "fingerprint": fingerprint, "stack": list(stack), "gated": bool(gated), "files": files}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def record_digest(meta: dict) -> str:
    """sha256 over all of patch.json but ``record_sha256`` itself (canonical JSON: sorted keys, no
    spaces). Stored as ``record_sha256``. Like ``binding`` it is not a signature; it makes a hand
    edit of a descriptive field (a rank, a method, a base name, a validation rate that ``patch
    info`` would show) an error instead of a record that disagrees with the patch."""
    body = {k: v for k, v in meta.items() if k != "record_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


def patch_id(file_hashes: dict[str, str]) -> str:
    """The identity of a patch: 16 hex digits over the sha256 of its weight (and gate) files.

    Computed from the files' actual hashes, never read from patch.json; equal to the id
    ``finalize_patch`` has always written, so existing ``stack`` entries stay valid.
    """
    return hashlib.sha256(json.dumps(file_hashes, sort_keys=True).encode()).hexdigest()[:16]
