"""The gate folder: what ``gate fit --out G`` writes, its one reader, and ``gate apply``.

A *gate folder* (``safety-patch gate fit --out G``) holds

* ``gate.safetensors``: the probe in :mod:`.probe`'s format (unchanged: the file a gated patch
  carries), and
* ``gate.json``: what made it and how good it is: kind ``safety-patch/gate``, the base model's
  name and fingerprint, the :class:`GateFitConfig`, prompt counts per kind, validation metrics
  on the data folder's validation split (AUROC, TPR at 1%/5% FPR, FPR at the threshold, each
  with n and a 95% interval), the data manifest's sha256, the code identity and library
  versions, the fit's seconds, and the sha256 of ``gate.safetensors``.

:func:`read_gate_folder` is the one reader: it checks ``gate.json`` against :class:`GateManifest`
and the gate file against the recorded sha256, failing closed with one ``SafetyPatchError`` line
naming file and field. ``train`` fits its gate through :func:`fit_gate_on_data` too, so a gated
patch's gate and a gate folder's are the same fit for the same data and config.

Any patch (a LoRA adapter or a full-parameter delta) can be put behind a gate made for its base
with :func:`apply_gate` (``safety-patch gate apply``).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from ..errors import SafetyPatchError
from ..patch_schema import BaseInfo, Sha256, _Strict
from .config import BATCHING, Batching, GateFitConfig
from .fit import fit_gate_on_data
from .probe import GATE_FILE, Gate

GATE_JSON = "gate.json"
GATE_KIND = "safety-patch/gate"


class GateManifest(_Strict):
    """``gate.json``: what the tooling acts on is required and strictly typed; the rest is descriptive."""

    kind: Literal["safety-patch/gate"]
    id: str
    """First 16 hex digits of the sha256 of gate.safetensors (display; checked)."""
    base: BaseInfo
    """The base the gate was fit on: it reads that model's hidden states only."""
    layer: int
    threshold: float
    files: dict[str, str]
    """{"gate.safetensors": sha256}: exactly that file."""
    extra_layers: list[int] = []
    """A multi-layer gate's further layers (absent: one layer); checked against the file."""
    config: dict[str, Any]
    prompts: dict[str, int]
    validation: dict[str, Any] | None = None
    data: dict[str, Any] | None = None
    code: dict[str, Any] | None = None
    versions: dict[str, Any] | None = None
    fit_seconds: float | None = None
    created: str | None = None
    binding: Sha256 | None = None
    """:func:`gate_binding` of the fields that say what the gate is for and how it was fit; absent
    only in gate folders written before 2026-12-03."""


BINDING_SINCE = "2026-12-03"
"""gate.json's ``created`` from which a ``binding`` is required (gates fit before carry none)."""


def gate_id(sha256: str) -> str:
    """A gate's identity: the first 16 hex digits of its gate.safetensors sha256."""
    return sha256[:16]


GATE_BOUND_FIELDS = "base.fingerprint, config, data.manifest_sha256 and files"
"""What :func:`gate_binding` covers, as error messages name it."""


def gate_binding(meta: dict) -> str:
    """sha256 over what a gate folder's ``gate.json`` says the gate *is* beyond its file: the base
    it reads (``base.fingerprint``: which model's hidden states, so which patches it may gate),
    the config it was fit with (what ``gate eval``'s refits fit again), the data folder's manifest
    (whether a refit on a folder is a refit of this gate) and the file's hash. Stored as
    ``binding``. As a patch's ``binding`` (patch_schema.binding_digest), not a signature: whoever
    recomputes it can forge it; it makes a hand edit of those fields an error instead of a gate
    silently applied to another base or refit as another gate."""
    import hashlib
    import json

    payload = {"kind": GATE_KIND, "fingerprint": meta["base"]["fingerprint"], "config": meta["config"],
               "data_manifest_sha256": (meta.get("data") or {}).get("manifest_sha256"), "files": meta["files"]}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


class GateNeverFires(SafetyPatchError):
    """A gate that fires on none of the harmful prompts it was fit on (:func:`check_protects`)."""


def check_protects(record: dict, where: str | Path, warn: bool = True) -> str | None:
    """Refuse a gate whose own record shows it never fires on a harmful prompt it was fit on
    (``train.train_harmful_caught`` 0, or ``train_harmful_caught`` at the top level as fits
    return it): such a gate keeps its patch off for every prompt, a gated patch that protects
    nothing while reading as protection (fail closed). ``record``: a gate fit's info, gate.json,
    or patch.json's ``gate``. Raises GateNeverFires (a SafetyPatchError) naming ``where`` and the threshold.

    A gate that fires on none of its held-out harmful prompts (``validation.fired``:
    harmful_direct and harmful_wrapped together) is not refused (on a small validation split
    that can be chance), but the warning returned (and logged, with ``warn``) says so; so is a gate that
    fires on every training benign prompt (``train_benign_flagged`` 1: its patch is on for every prompt),
    and one whose validation AUROC (``validation.direct_vs_benign.auroc``) has a 95% interval
    reaching 0.5 (its routing is not told apart from chance).
    None otherwise; a record without these figures passes (``patch verify`` routes probe prompts
    through any gate)."""
    import logging

    train = record.get("train") if isinstance(record.get("train"), dict) else record
    t = record.get("threshold")
    at = f" at threshold {t:+.4g}" if isinstance(t, (int, float)) else ""
    caught = train.get("train_harmful_caught")
    if isinstance(caught, (int, float)) and caught == 0 and train.get("harmful"):
        raise GateNeverFires(f"{where}: the gate fires on none of its {train['harmful']} training harmful prompts{at}: "
                               "it would never apply its patch (fail closed): set the threshold from a "
                               "false-positive rate (--target-fpr) or lower --threshold")
    msgs = []
    flagged = train.get("train_benign_flagged")
    if isinstance(flagged, (int, float)) and flagged >= 1 and train.get("benign"):
        # not fail-open (the patch applies everywhere), but a gate in name only: every safe prompt is refused
        msgs.append(f"warning: {where}: the gate fires on all {train['benign']} of its training benign prompts{at}: "
                    "its patch applies to every prompt, as an always-on patch would; raise --threshold or set it "
                    "from a false-positive rate (--target-fpr)")
    fired = ((record.get("validation") or {}).get("fired") or {})
    harmful = [fired[k] for k in ("harmful_direct", "harmful_wrapped") if isinstance(fired.get(k), dict)]
    n = sum(int(f.get("n") or 0) for f in harmful)
    if n and not sum(int(f.get("k") or 0) for f in harmful):
        msgs.append(f"warning: {where}: the gate fires on none of the {n} held-out harmful prompts of its validation "
                    f"report{at}: it may protect nothing; check `gate eval` before relying on it")
    auc = ((record.get("validation") or {}).get("direct_vs_benign") or {}).get("auroc") or {}
    ci = auc.get("ci95") if isinstance(auc, dict) else None
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(x, (int, float)) for x in (auc.get("value"), *ci)) \
            and ci[0] <= 0.5:
        # fires on some harmful prompts, so the check above is quiet, yet routes no better than a coin
        msgs.append(f"warning: {where}: the gate's validation AUROC (harmful direct vs benign) is {auc['value']:.3f} "
                    f"[{ci[0]:.3f}, {ci[1]:.3f}], n = {auc.get('n_pos')} + {auc.get('n_neg')}: not told apart from chance; "
                    "which prompts get the patch is near random; check `gate eval` before relying on it")
    if warn:
        for msg in msgs:
            logging.getLogger("safety_patch").warning(msg)
    return "\n".join(msgs) or None


def write_gate_folder(out: str | Path, gate: Gate, info: dict, base: dict, cfg: GateFitConfig, data_dir: str | Path,
                      overwrite: bool = False) -> dict:
    """Write ``out`` (atomically): gate.safetensors + gate.json; returns gate.json's content.

    ``base``: {"name", "fingerprint"} of the model the gate was fit on. The folder is read back
    with :func:`read_gate_folder` before it is published."""
    from ..atomic import atomic_dir, sha256_file, write_json
    from ..data.build import manifest_sha256
    from ..provenance import code_identity, library_versions

    check_protects({**info, "threshold": gate.threshold}, out)  # before anything is written
    with atomic_dir(Path(out), overwrite=overwrite, kind="gate") as tmp:
        gate.save(tmp)
        sha = sha256_file(tmp / GATE_FILE)
        meta = {"kind": GATE_KIND, "id": gate_id(sha), "base": base, "layer": gate.layer,
                **({"extra_layers": list(gate.extra_layers)} if gate.extra_layers else {}), "threshold": gate.threshold,
                "config": dataclasses.asdict(cfg), "prompts": info["prompts"],
                "train": {k: info[k] for k in ("harmful", "benign", "train_harmful_caught", "train_benign_flagged")},
                **({"threshold_from": info["threshold_from"]} if "threshold_from" in info else {}),
                "validation": info.get("validation"), "position": info["position"],
                "data": {"dir": str(Path(data_dir).resolve()), "manifest_sha256": manifest_sha256(data_dir)},
                "files": {GATE_FILE: sha}, "code": code_identity(), "versions": library_versions(),
                "fit_seconds": info["fit_seconds"], "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        meta["binding"] = gate_binding(meta)
        write_json(tmp / GATE_JSON, meta)
        read_gate_folder(tmp)
    return meta


def read_gate_folder(path: str | Path) -> tuple[Gate, dict]:
    """Open and check a gate folder: (the Gate, gate.json's content).

    Fails closed with one SafetyPatchError line naming file and field: no folder or no
    gate.json; gate.json not JSON or off :class:`GateManifest`; ``files`` not exactly
    gate.safetensors; the file's sha256 or the id not what gate.json records; ``binding`` not
    :func:`gate_binding` of the fields it covers (a hand-edited base fingerprint, config or data
    hash); a gate that cannot decide (probe.py); layer or threshold in gate.json not the file's.
    A gate.json written before bindings (no ``binding``) is read with those fields unchecked
    (:func:`evaluate_gate` says so in its report).
    """
    from ..atomic import interrupted_note, sha256_file
    from ..patch_schema import first_error, load_json_object

    path = Path(path)
    if not path.is_dir():
        raise SafetyPatchError(f"gate folder not found: {path}{interrupted_note(path)}")
    gj = path / GATE_JSON
    if not gj.is_file():
        raise SafetyPatchError(f"{path} has no {GATE_JSON}: not a gate folder from `safety-patch gate fit`")
    raw = load_json_object(gj)
    try:
        man = GateManifest.model_validate(raw)
    except ValidationError as e:
        raise first_error(gj, e, raw) from None
    if not man.base.fingerprint:
        raise SafetyPatchError(f"{gj}: field 'base.fingerprint' is empty; a gate is bound to the base it was fit on")
    if set(man.files) != {GATE_FILE}:
        raise SafetyPatchError(f"{gj}: field 'files' must list exactly {GATE_FILE}, lists {sorted(man.files)}")
    gf = path / GATE_FILE
    if not gf.is_file():
        raise SafetyPatchError(f"{path} is missing {GATE_FILE}")
    sha = sha256_file(gf)
    if sha != man.files[GATE_FILE]:
        raise SafetyPatchError(f"{gf}: sha256 differs from {GATE_JSON} field 'files' (file changed or damaged)")
    if man.id != gate_id(sha):
        raise SafetyPatchError(f"{gj}: field 'id' is {man.id!r}, but {GATE_FILE} hashes to id {gate_id(sha)}")
    if man.binding is None and not (man.created and man.created < BINDING_SINCE):
        # deleting the seal must not switch it off: only a gate written before seals existed may lack one
        raise SafetyPatchError(f"{gj}: field 'binding' is missing, and the gate was written on {man.created or '(no date)'}, "
                               f"when every gate.json carried one (gate.json edited?); fit the gate again")
    if man.binding is not None and man.binding != gate_binding(raw):
        raise SafetyPatchError(f"{gj}: field 'binding' does not match {GATE_BOUND_FIELDS} (gate.json edited after "
                               "the fit?); fit the gate again rather than edit what it was fit on")
    gate = Gate.load(path)
    if gate.layer != man.layer:
        raise SafetyPatchError(f"{gj}: field 'layer' is {man.layer}, {GATE_FILE} holds layer {gate.layer}")
    if list(gate.extra_layers) != man.extra_layers:
        raise SafetyPatchError(f"{gj}: field 'extra_layers' is {man.extra_layers}, {GATE_FILE} holds "
                               f"{list(gate.extra_layers)}")
    if not (math.isfinite(man.threshold) and math.isclose(gate.threshold, man.threshold, rel_tol=1e-6, abs_tol=1e-6)):
        raise SafetyPatchError(f"{gj}: field 'threshold' is {man.threshold}, {GATE_FILE} holds {gate.threshold}")
    return gate, raw


def read_gate_source(path: str | Path) -> tuple[Gate, dict, Path]:
    """The gate of a gate folder (``gate fit``) or of a gated patch (``train``, ``gate apply``):
    (the Gate, a ``gate.json``-shaped record of it, the file that record comes from).

    A gate folder is read by :func:`read_gate_folder`. A gated patch is read by
    ``patches.read_patch`` (every check of a patch: hashes, id, binding, a gate that can decide),
    and its record is built from ``patch.json``: the base; the fit config and the data folder's
    manifest hash from the ``gate`` entry where ``gate apply`` copied them there, else the
    training run's own (``config.gate``, ``data``: ``train`` fits its gate with exactly that
    config on that folder); ``from_patch`` names the patch. ``patch.json``'s binding covers its
    files and base, not those two fields, so :func:`evaluate_gate`'s report says so. Raises
    SafetyPatchError naming the folder: neither gate.json nor patch.json, a patch without a gate,
    or a gated patch that records no fit config (nothing to refit)."""
    from ..patches import PATCH_JSON, read_patch

    path = Path(path)
    if (path / GATE_JSON).is_file() or not (path / PATCH_JSON).is_file():
        gate, raw = read_gate_folder(path)
        return gate, raw, path / GATE_JSON
    p = read_patch(path)
    pj = path / PATCH_JSON
    if not p.gated:
        raise SafetyPatchError(f"{path}: an ungated patch has no gate (give a gate folder from `gate fit`, or a gated "
                               "patch from `train` or `gate apply`)")
    info = p.meta["gate"]
    config = info.get("config") or (p.meta.get("config") or {}).get("gate")
    if not isinstance(config, dict):
        raise SafetyPatchError(f"{pj}: records no config of its gate's fit (neither 'gate.config' nor 'config.gate'), "
                               "so the gate cannot be refit or evaluated as it was fit")
    gate = Gate.load(path)
    data = info.get("data") if "config" in info else p.meta.get("data")
    meta = {"kind": GATE_KIND, "id": info.get("id") or gate_id(p.meta["files"][GATE_FILE]), "base": p.meta["base"],
            "layer": gate.layer, **({"extra_layers": list(gate.extra_layers)} if gate.extra_layers else {}),
            "threshold": gate.threshold, "config": config, "prompts": info.get("prompts") or {},
            "data": {k: v for k, v in (data or {}).items() if k in ("dir", "manifest_sha256")} or None,
            "files": {GATE_FILE: p.meta["files"][GATE_FILE]}, "from_patch": {"id": p.id, "path": str(Path(path).resolve())},
            "fit_stack": p.gate_fit_stack,
            **{k: info[k] for k in ("threshold_from", "validation", "position", "fit_seconds") if k in info}}
    return gate, meta, pj


def fit_gate_folder(lm, data_dir: str | Path, cfg: GateFitConfig, out: str | Path, overwrite: bool = False,
                    batching: Batching = BATCHING) -> dict:
    """``safety-patch gate fit``: fit a gate for ``lm`` (a models.LoadedModel, no patches attached)
    on ``data_dir`` and write the gate folder ``out`` atomically; returns gate.json's content."""
    from ..data.folder import DataFolder

    d = DataFolder(data_dir)
    gate, info = fit_gate_on_data(lm.model, lm.tokenizer, d, cfg, batching=batching, fingerprint=lm.fingerprint)
    return write_gate_folder(out, gate, info, {"name": lm.name, "fingerprint": lm.fingerprint}, cfg, data_dir, overwrite)


# ----------------------------------------------------------------------------- applying and evaluating


def apply_gate(patch_dir: str | Path, gate_dir: str | Path, out: str | Path, overwrite: bool = False,
               replace: bool = False) -> dict:
    """Write a new gated patch at ``out``: ``patch_dir``'s weight files behind ``gate_dir``'s gate
    (a gate folder, or a gated patch whose gate is taken: :func:`read_gate_source`).

    Works for a LoRA adapter and a full-parameter delta. ``patch.json`` keeps the patch's
    base, stack and descriptive fields, records the gate (layer, threshold, id, config,
    prompt counts, validation report, provenance) and the patch it came from; id and binding
    are computed anew (``patches.finalize_patch``). ``replace``: ``patch_dir`` is a gated patch
    whose gate is swapped for the new one (``gated_from``, where it has one, still names the ungated patch; the
    old gate and the gated patch it came from are recorded in ``replaced_gate``). Raises
    SafetyPatchError for a gated patch without ``replace``, an ungated one with it, or a gate fit
    on another base (fingerprints differ); nothing is written then.
    """
    import shutil

    from ..atomic import atomic_dir
    from ..patches import finalize_patch, read_patch, weight_files

    p = read_patch(patch_dir)
    gate, gmeta, where = read_gate_source(gate_dir)
    check_protects(gmeta, where)
    # A gate fit by `train` itself records no id in patch.json: its id is that of its file, as for a gate folder.
    old_id = p.meta["gate"].get("id") or gate_id(p.meta["files"][GATE_FILE]) if p.gated else None
    if p.gated and not replace:
        raise SafetyPatchError(f"{p.path} is already gated (gate {old_id}); pass --replace to swap its "
                               "gate, or apply the gate to the ungated patch it was made from")
    if replace and not p.gated:
        raise SafetyPatchError(f"{p.path} has no gate to replace; drop --replace to put it behind one")
    if gmeta["base"]["fingerprint"] != p.base_fingerprint:
        raise SafetyPatchError(f"{where}: field 'base.fingerprint' is {gmeta['base']['fingerprint'][:12]}…, "
                               f"but {p.path} was made for base {p.base_fingerprint[:12]}…; a gate reads the hidden states "
                               "of the model it was fit on")
    keep = ("method", "objective", "config", "data", "training")
    fields = {k: p.meta[k] for k in keep if k in p.meta}
    fields["stack"] = p.stack
    fit_stack = list(gmeta.get("fit_stack", []))  # a gate folder's gate was fit on the bare base
    if fit_stack != p.stack:  # e.g. a red-team round's patch behind a gate fit on the bare base
        import logging

        fit_on = f"the base with {', '.join(fit_stack)}" if fit_stack else "the base alone"
        below = ", ".join(p.stack) if p.stack else "the base alone"
        logging.getLogger("safety_patch").warning(
            "warning: the gate of %s was fit on %s, but %s was trained on top of %s: in that stack the gate reads "
            "hidden states it was not fit on, so its routing there is unmeasured (measure it: `safety-patch eval` "
            "with each patch of the stack as --patch, in order)", where, fit_on, p.path, below)
    fields["gate"] = {"layer": gate.layer, **({"extra_layers": list(gate.extra_layers)} if gate.extra_layers else {}),
                      "threshold": gate.threshold, "id": gmeta["id"], "source": str(Path(gate_dir).resolve()), "fit_stack": fit_stack,
                      **({"source_patch": gmeta["from_patch"]["id"]} if "from_patch" in gmeta else {}),
                      **{k: gmeta[k] for k in ("config", "prompts", "train", "threshold_from", "validation", "position",
                                               "data", "code", "versions", "fit_seconds") if k in gmeta}}
    if replace:
        # A patch gated by `train` itself has no ungated origin to name (no gated_from).
        fields["gated_from"] = p.meta.get("gated_from")
        fields["replaced_gate"] = {"id": old_id, "threshold": p.meta["gate"]["threshold"],
                                   "patch": p.id, "path": str(Path(p.path).resolve())}
    else:
        fields["gated_from"] = {"patch": p.id, "path": str(Path(p.path).resolve()), "code": p.meta.get("code"),
                                "created": p.meta.get("created")}
    fields["versions"] = p.meta.get("versions")
    fields = {k: v for k, v in fields.items() if v is not None}
    with atomic_dir(Path(out), overwrite=overwrite, kind="patch") as tmp:
        for f in weight_files(p.format):
            shutil.copyfile(p.path / f, tmp / f)
        shutil.copyfile(Path(gate_dir) / GATE_FILE, tmp / GATE_FILE)
        meta = finalize_patch(tmp, p.format, dict(p.meta["base"]), **fields)
    return meta


_RETIRED_CONFIG_KEYS = ("written_breadth",)
"""gate.json config keys older code wrote and recorded_config still reads (as their successors)."""


def recorded_config(gmeta: dict, gate, where: str = GATE_JSON) -> GateFitConfig:
    """The config a gate folder was fit with, for refits (leave one source / family out, the
    look-alike cross-fit) that must read what the gate reads: ``gate.json``'s ``config`` with the
    layers pinned to the gate file's (``layer``, ``extra_layers``: a gate fit before extra layers or
    depths existed must not be refit on today's default depths), and fields a file written before
    they existed lacks set to what that code did (no out-of-family raise, extra features unscaled,
    no hand-written prompts). Raises SafetyPatchError (naming ``where``) for a key this code does
    not know: a refit that ignored it would measure another gate than the one recorded."""
    known = {f.name for f in dataclasses.fields(GateFitConfig)}
    unknown = sorted(set(gmeta["config"]) - known - set(_RETIRED_CONFIG_KEYS))
    if unknown:
        raise SafetyPatchError(f"{where}: config key{'s' * (len(unknown) > 1)} {', '.join(map(repr, unknown))} unknown to "
                               f"this safety-patch (written by a newer version?): refits would not fit the recorded gate")
    rec = {k: v for k, v in gmeta["config"].items() if k in known}
    rec.setdefault("family_fpr", None)
    rec.setdefault("extra_weight", 1.0)
    if "written_breadth" in gmeta["config"]:  # one flag for both, for a day (session 25)
        rec |= dict.fromkeys(("written_harmful_more", "written_lookalikes"), bool(gmeta["config"]["written_breadth"]))
    rec.setdefault("written_harmful_more", False)
    rec.setdefault("written_lookalikes", False)
    rec.setdefault("written_harmful", False)
    rec |= {"layer": gate.layer, "extra_layers": list(gate.extra_layers)}
    rec.pop("extra_depths", None)  # pinned by extra_layers above
    return GateFitConfig(**rec)
