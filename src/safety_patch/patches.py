"""Patches: a LoRA adapter or a weight delta, plus ``patch.json``; attach, detach, stack, merge.

A patch folder holds either

* ``adapter_config.json`` + ``adapter_model.safetensors``: a standard PEFT LoRA adapter that
  ``PeftModel.from_pretrained`` and vLLM's LoRA loader accept unchanged, or
* ``delta.safetensors``: W_ft - W0 (fp32) of every tensor a full-parameter run changed,

and ``patch.json``: what made it (base fingerprint, method, hyper-parameters, data hash,
costs, versions) and the sha256 of its weight files. A *gated* patch (LoRA or delta;
``safety-patch gate apply``, gate/folder.py) also holds ``gate.safetensors`` (gate/probe.py): a probe
on the prompt that decides, per prompt, whether the patch applies. Gated patches attach, stack and evaluate like any other; they cannot be
merged into weights or trained on top of, because their adapter is not always on.

Stacking semantics: every patch is additive. Delta patches are added to the base weights;
LoRA adapters are injected and all active together (y = W x + sum_i s_i B_i A_i x). The sum
does not depend on order beyond float rounding. A patch trained on top of others records
them in ``stack``; it must be attached after them (checked), because it was trained to
complement exactly that stack.

Only safetensors are read, never pickles. ``attached`` restores the base in ``finally``:
LoRA layers are unloaded and replaced tensors restored from copies, so detached logits are
bit-identical to the base.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import interrupted_note, sha256_file
from .errors import SafetyPatchError
from .patched import PatchedModel

log = logging.getLogger(__name__)

PATCH_JSON = "patch.json"
LORA_FILES = ("adapter_config.json", "adapter_model.safetensors")
DELTA_FILE = "delta.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@dataclass
class Patch:
    path: Path
    meta: dict
    format: str  # "lora" | "delta"
    id: str = field(default="")
    stats: dict = field(default_factory=dict, compare=False, repr=False)
    """Each read file's (inode, size, mtime_ns, ctime_ns) when ``read_patch`` began checking it:
    ``attached`` compares them before and after loading, so a file changed after the check (a
    long-running server re-attaching, say) is checked again instead of loaded unverified."""

    @property
    def base_fingerprint(self) -> str:
        return self.meta.get("base", {}).get("fingerprint", "")

    @property
    def stack(self) -> list[str]:
        return list(self.meta.get("stack", []))

    @property
    def name(self) -> str:
        return folder_name(self.path)

    @property
    def gated(self) -> bool:
        return bool(self.meta.get("gate"))

    @property
    def gate_fit_stack(self) -> list[str]:
        """The ids of the patches whose updates were in the model when its gate was fit (empty
        for an ungated patch): ``gate.fit_stack`` where recorded (``gate apply`` since 2026-12-05;
        a gate folder is fit on the bare base); for a gate ``gate apply`` took from a gate folder
        before then, none; otherwise the patch's own ``stack`` (``train`` fits its gate on the base
        with that stack folded in)."""
        g = self.meta.get("gate") or {}
        if not g:
            return []
        if isinstance(g.get("fit_stack"), list):
            return list(g["fit_stack"])
        if "source" in g and "source_patch" not in g:  # applied from a gate folder: fit on the bare base
            return []
        return self.stack

    @property
    def sealed(self) -> bool:
        """Whether patch.json's descriptive fields are covered by ``record_sha256`` (patches written
        since 2026-12-03); the fields that decide what attaching means are bound either way."""
        return bool(self.meta.get("record_sha256"))


def weight_files(fmt: str, gated: bool = False) -> tuple[str, ...]:
    from .gate.probe import GATE_FILE

    # A gate may front either kind of patch (gate.folder.apply_gate): its file is one of the patch's files.
    return (LORA_FILES if fmt == "lora" else (DELTA_FILE,)) + ((GATE_FILE,) if gated else ())


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            for k in keys:  # touching each tensor catches truncation past the header
                f.get_slice(k)
        size = path.stat().st_size
        with open(path, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + n + end != size:
            raise ValueError(f"file is {size} bytes, header says {8 + n + end}")
    except Exception as e:
        raise SafetyPatchError(f"{path}: corrupt or truncated safetensors file ({type(e).__name__}: {e})") from None


def _file_error(path: Path, msg: str) -> SafetyPatchError:
    return SafetyPatchError(f"{path}: {msg}")


def _lora_module(key: str) -> tuple[str, str]:
    """(module path, "A" | "B") of a PEFT adapter tensor name; raises for any other tensor kind."""
    prefix = "base_model.model."
    for part in ("A", "B"):
        suffix = f".lora_{part}.weight"
        if key.startswith(prefix) and key.endswith(suffix):
            return key[len(prefix) : -len(suffix)], part
    if key.endswith(".base_layer.weight"):  # PEFT saves these when an adapter targets lm_head or an embedding
        raise SafetyPatchError(
            f"tensor {key} is a full copy of a base weight, not a LoRA factor (PEFT writes one when an adapter "
            "targets lm_head or an embedding, which may be tied to the input embeddings); only LoRA factors load")
    raise SafetyPatchError(
        f"tensor {key} is not a LoRA factor (base_model.model.<module>.lora_A/lora_B.weight); only plain LoRA adapters load")


def check_weight_tensors(folder: Path, fmt: str, rank: int | None = None, rank_pattern: dict | None = None) -> None:
    """Every tensor of a patch's weight file finite, and the patch not a no-op.

    LoRA: every tensor a ``lora_A`` [r, in] or ``lora_B`` [out, r] factor, in pairs, with the
    rank ``adapter_config.json`` gives (``rank``/``rank_pattern``); some ``lora_B`` and some
    ``lora_A`` nonzero (all-zero B, as with learning rate 0, means the adapter changes nothing).
    Delta: some tensor nonzero. Reads one tensor at a time (deltas can be GB). Raises
    SafetyPatchError naming the file and the first offending tensor.
    """
    from safetensors import safe_open

    path = folder / (LORA_FILES[1] if fmt == "lora" else DELTA_FILE)
    factors: dict[str, dict[str, tuple[int, ...]]] = {}
    nonzero = {"A": False, "B": False, "delta": False}
    with safe_open(str(path), framework="pt") as f:
        keys = sorted(f.keys())
        if not keys:
            raise _file_error(path, "holds no tensors: the patch changes nothing")
        for k in keys:
            t = f.get_tensor(k)
            if not t.is_floating_point():
                raise _file_error(path, f"tensor {k} has dtype {t.dtype}; patch weights are floating point")
            if not bool(torch.isfinite(t).all()):
                raise _file_error(path, f"tensor {k} holds non-finite values (NaN or inf): a broken patch")
            kind = "delta"
            if fmt == "lora":
                try:
                    module, kind = _lora_module(k)
                except SafetyPatchError as e:
                    raise _file_error(path, str(e)) from None
                if t.ndim != 2:
                    raise _file_error(path, f"tensor {k} has shape {tuple(t.shape)}; LoRA factors are matrices")
                factors.setdefault(module, {})[kind] = tuple(t.shape)
            nonzero[kind] = nonzero[kind] or bool(t.any())
    if fmt == "delta":
        if not nonzero["delta"]:
            raise _file_error(path, "every tensor is zero: the patch changes nothing")
        return
    from peft.utils.other import get_pattern_key

    for module, fs in sorted(factors.items()):
        if set(fs) != {"A", "B"}:
            missing = "lora_B" if "A" in fs else "lora_A"
            raise _file_error(path, f"module {module} has no {missing} tensor (LoRA factors come in pairs)")
        want = rank
        if rank_pattern:
            want = rank_pattern.get(get_pattern_key(list(rank_pattern), module), rank)
        ra, rb = fs["A"][0], fs["B"][1]
        if ra != rb or (want is not None and ra != want):
            raise _file_error(path, f"module {module}: lora_A is {fs['A']} and lora_B is {fs['B']}, "
                                    f"but adapter_config.json gives rank {want}")
    for kind in ("B", "A"):
        if not nonzero[kind]:
            raise _file_error(path, f"every lora_{kind} tensor is zero: the adapter changes nothing (trained with lr 0?)")


def folder_name(path: str | Path) -> str:
    """The name a patch folder goes by (routes, ``serve``'s model names, records): the last part of
    the path as given, made absolute without resolving links, so ``patches/safety`` is ``safety`` even
    where it links to ``runs/p``, ``runs/p/`` is ``p`` and ``.`` names the current folder."""
    import os

    return Path(os.path.abspath(path)).name


def read_patch(path: str | Path, check_hashes: bool = True) -> Patch:
    """Open and validate a patch folder; the one reader of patch folders.

    Checks, failing closed with one SafetyPatchError line naming file and field: patch.json
    against its schema (patch_schema.py); no pickles; exactly the weight files the manifest's
    format and gate call for (a gate.safetensors without a ``gate`` entry is an error, not
    ignored); each file's sha256 against ``files``; ``id`` against the id computed from the
    files; every tensor finite and the patch not a no-op; adapter_config.json valid and its
    rank matching the tensors; a gate that can decide. ``check_hashes`` is kept for old
    callers and no longer switches anything off: the id is computed from the file hashes.
    """
    from .gate.probe import GATE_FILE, Gate
    from .patch_schema import binding_digest, patch_id, read_adapter_config, read_manifest, record_digest

    del check_hashes  # hashes are always checked: the patch id is derived from them
    path = Path(path)
    if path.is_file():
        raise SafetyPatchError(f"{path} is a file; a patch is the folder that holds {PATCH_JSON} "
                               f"(here: {path.parent})")
    if not path.is_dir():
        raise SafetyPatchError(f"patch folder not found: {path}{interrupted_note(path)}")
    pj = path / PATCH_JSON
    if not pj.is_file() and (path / "merged_from.json").is_file():
        raise SafetyPatchError(f"{path} is a merged checkpoint (`patch merge` wrote it: merged_from.json), not a "
                               f"patch: use it as --model {path}; `safety-patch model info --model {path}` shows the "
                               "patches folded into it and its base")
    if not pj.is_file():
        inside = sorted(q.parent for q in path.glob(f"*/{PATCH_JSON}"))  # a run's stage folder holds its patch below
        hint = (f"; the patch{'es' if len(inside) > 1 else ''} inside it: {', '.join(map(str, inside[:4]))}"
                if inside else "")
        raise SafetyPatchError(f"{path} has no {PATCH_JSON}: not a safety-patch patch (or an unfinished run){hint}")
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise SafetyPatchError(f"{path} contains pickle files ({', '.join(pickles)}); only safetensors are loaded")
    stats = _file_stats(path)  # before any check: a change while checking shows as a difference later
    meta, man = read_manifest(pj)
    fmt = man.format
    gated = man.gate is not None
    if (path / GATE_FILE).is_file() and not gated:
        raise SafetyPatchError(f"{pj}: the folder holds {GATE_FILE} but patch.json has no 'gate' field; "
                               "a gated patch whose gate was dropped would apply to every prompt, so it is refused")
    files = weight_files(fmt, gated)
    for f in files:
        if not (path / f).is_file():
            raise SafetyPatchError(f"{path} is missing {f}")
    extra = sorted(set(man.files) - set(files))
    lacking = [f for f in files if f not in man.files]
    if lacking or extra:
        raise SafetyPatchError(f"{pj}: field 'files' must list the sha256 of exactly {', '.join(files)}; "
                               + (f"'{lacking[0]}' is missing" if lacking else f"'{extra[0]}' is not a file of this patch"))
    hashes = {}
    for f in files:
        if f.endswith(".safetensors"):
            _check_safetensors(path / f)
        hashes[f] = sha256_file(path / f)
        if hashes[f] != man.files[f]:
            raise SafetyPatchError(f"{path / f}: sha256 differs from {PATCH_JSON} (file changed or damaged)")
    if fmt == "lora":
        cfg = read_adapter_config(path / LORA_FILES[0])
        check_weight_tensors(path, fmt, cfg.r, cfg.rank_pattern)
    else:
        check_weight_tensors(path, fmt)
    if gated:
        from .gate.folder import check_protects

        check_protects(meta["gate"], pj, warn=False)  # a gate that never fires: a patch that never applies
        gate = Gate.load(path)
        said = (man.gate.layer, *man.gate.extra_layers)
        if gate.layers != said or not math.isclose(gate.threshold, man.gate.threshold, rel_tol=1e-6, abs_tol=1e-6):
            raise SafetyPatchError(
                f"{pj}: field 'gate' says layer{'s' * (len(said) > 1)} {', '.join(map(str, said))}, threshold "
                f"{man.gate.threshold}, but {GATE_FILE} holds layer{'s' * (len(gate.layers) > 1)} "
                f"{', '.join(map(str, gate.layers))}, threshold {gate.threshold}")
    # Checked last, so that a damaged file is named before the id that no longer matches it.
    pid = patch_id(hashes)
    if man.id != pid:
        raise SafetyPatchError(f"{pj}: field 'id' is {man.id}, but the patch's files hash to id {pid} "
                               "(patch.json edited or copied from another patch)")
    if man.binding != binding_digest(fmt, man.base.fingerprint, man.stack, gated, hashes):
        raise SafetyPatchError(f"{pj}: field 'binding' does not match format, base.fingerprint, stack, gate and files "
                               "(patch.json edited by hand: restore it, or re-create the patch)")
    if man.record_sha256 is not None and man.record_sha256 != record_digest(meta):
        raise SafetyPatchError(f"{pj}: field 'record_sha256' does not match the record: a descriptive field (config, "
                               "training, data, the gate's validation report, base name...) was edited by hand; "
                               "restore patch.json, or re-create the patch")
    _check_described(pj, man, fmt, cfg if fmt == "lora" else None)
    return Patch(path, meta, fmt, pid, stats)


def _file_stats(path: Path) -> dict[str, tuple[int, int, int, int] | None]:
    """(inode, size, mtime_ns, ctime_ns) of each file of a patch folder that attaching reads
    (patch.json, the weights, adapter_config.json, the gate; None where absent). ctime cannot be set
    back by hand, so an in-place edit shows even when mtime is restored."""
    from .gate.probe import GATE_FILE

    out: dict[str, tuple[int, int, int, int] | None] = {}
    for name in (PATCH_JSON, *LORA_FILES, DELTA_FILE, GATE_FILE):
        try:
            st = (path / name).stat()
        except FileNotFoundError:
            out[name] = None
            continue
        out[name] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return out


def check_unchanged(p: Patch) -> Patch:
    """``p`` if its folder's files are as ``read_patch`` found them; otherwise the folder is checked
    again and must still be the same patch (same id and record), or SafetyPatchError: a patch that
    changed on disk after it was checked is never attached unverified (fail closed)."""
    if p.stats and _file_stats(p.path) == p.stats:
        return p
    try:
        q = read_patch(p.path)
    except SafetyPatchError as e:
        raise SafetyPatchError(f"{p.path} changed on disk since it was checked, and no longer reads as a patch: {e}") from None
    if q.id != p.id or q.meta != p.meta:
        raise SafetyPatchError(f"{p.path} changed on disk since it was checked (patch id {p.id} -> {q.id}); "
                               "refusing to attach another patch than the one checked: restart with the new one")
    return q


def _check_described(pj: Path, man, fmt: str, adapter) -> None:
    """What patch.json says the patch is agrees with its bound files: ``method`` with the format, and a
    LoRA's recorded rank and alpha with adapter_config.json (an unsealed older patch is checked too)."""
    method = man.method
    if method is not None and (method, fmt) not in (("lora", "lora"), ("full", "delta")):
        raise SafetyPatchError(f"{pj}: field 'method' is {method!r}, but the patch's format is {fmt!r} "
                               f"(method lora has format lora, full has delta)")
    lora = (man.config or {}).get("lora")
    lora = lora if isinstance(lora, dict) else {}
    if adapter is not None:
        for key, have in (("rank", adapter.r), ("alpha", adapter.lora_alpha)):
            said = lora.get(key)
            if said is not None and said != have:
                raise SafetyPatchError(f"{pj}: field 'config.lora.{key}' is {said!r}, but adapter_config.json holds "
                                       f"{have!r} (patch.json edited by hand)")


def finalize_patch(folder: Path, fmt: str, base: dict, **fields) -> dict:
    """Write ``patch.json`` into a folder that already holds the weight files; returns it.

    The finished folder is then read back with ``read_patch``, so a patch with non-finite or
    all-zero weights, a degenerate gate or metadata off the schema is an error at write time
    (SafetyPatchError; patch.json is removed again, so the folder is not a patch).
    """
    import time

    from . import __version__
    from .patch_schema import binding_digest, patch_id, record_digest
    from .provenance import code_identity

    files = {f: sha256_file(folder / f) for f in weight_files(fmt, "gate" in fields)}
    meta = {
        "kind": "safety-patch/patch",
        "format": fmt,
        "id": patch_id(files),
        "base": base,
        "stack": [],
        **fields,
        "files": files,
        "safety_patch_version": __version__,
        "code": code_identity(),  # the project's commit and source hash (provenance.py)
        "binding": binding_digest(fmt, base.get("fingerprint", ""), fields.get("stack", []), "gate" in fields, files),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    meta["record_sha256"] = record_digest(json.loads(json.dumps(meta)))  # as read back: tuples become lists
    from .atomic import write_json

    write_json(folder / PATCH_JSON, meta)
    try:
        read_patch(folder)
    except SafetyPatchError:
        (folder / PATCH_JSON).unlink(missing_ok=True)
        raise
    return meta


def _module_names(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _check_lora_shapes(patch: Patch, model: torch.nn.Module) -> None:
    """Every adapter tensor names a Linear module of ``model`` and fits it: lora_A [r, in], lora_B [out, r]."""
    from safetensors import safe_open

    modules = dict(model.named_modules())
    path = patch.path / LORA_FILES[1]
    with safe_open(str(path), framework="pt") as f:
        for k in sorted(f.keys()):
            name, part = _lora_module(k)
            mod = modules.get(name)
            if not isinstance(mod, torch.nn.Linear):
                what = "matches no module of the model" if mod is None else f"names a {type(mod).__name__}, not a Linear"
                raise SafetyPatchError(f"{path}: tensor {k} {what} (module path {name})")
            shape = tuple(f.get_slice(k).get_shape())
            need = (shape[0], mod.in_features) if part == "A" else (mod.out_features, shape[1])
            if shape != need:
                raise SafetyPatchError(f"{path}: {k} has shape {shape}, the model needs {need} "
                                       f"({name} is Linear {mod.in_features}->{mod.out_features})")


def _check_gate_fits(patch: Patch, model: torch.nn.Module) -> None:
    """The gate's vectors have the model's hidden size (per layer it reads) and its layers exist."""
    from .gate.probe import GATE_FILE, Gate

    gate = Gate.load(patch.path)
    cfg = getattr(model, "config", None)
    hidden = getattr(cfg, "hidden_size", None)
    k = len(gate.layers)
    if hidden is not None and gate.weight.shape[0] != k * hidden:
        raise SafetyPatchError(f"{patch.path / GATE_FILE}: vectors have length {gate.weight.shape[0]}, "
                               f"the model's hidden size is {hidden}" + (f" ({k} layers: {k * hidden})" if k > 1 else ""))
    layers = getattr(cfg, "num_hidden_layers", None)
    bad = [i for i in gate.layers if layers is not None and not 0 <= i < layers]
    if bad:
        raise SafetyPatchError(f"{patch.path / GATE_FILE}: layer {bad[0]} out of range: the model has layers 0-{layers - 1}")


def verify(patch: Patch, model: torch.nn.Module, fingerprint: str | None, force: bool = False,
           remedy: str = "pass --force to attach anyway") -> list[str]:
    """Check a patch against a model; returns warnings (with ``force``) or raises SafetyPatchError.

    ``force`` waives only the base-fingerprint binding (a warning is logged and returned);
    tensor names and shapes, target modules and the gate's size are always checked.
    ``fingerprint=None`` means the caller has no fingerprint for ``model`` (in-process use).
    ``remedy``: what the refusal of another base suggests (a command without ``--force`` says otherwise).
    """
    problems = []
    if fingerprint is not None and patch.base_fingerprint and patch.base_fingerprint != fingerprint:
        problems.append(
            f"patch {patch.path} was made for base {patch.base_fingerprint[:12]}…, but the model is {fingerprint[:12]}… "
            f"(the patch's base: {patch.meta['base'].get('name') or '?'}; loaded: "
            f"{getattr(getattr(model, 'config', None), 'name_or_path', '') or 'a model without a recorded name'})"
        )
    if patch.format == "lora":
        from .patch_schema import read_adapter_config

        targets = read_adapter_config(patch.path / LORA_FILES[0]).target_modules
        names = _module_names(model)
        if isinstance(targets, str):  # PEFT: a string is a regex matched against full module names
            import re

            missing = [] if targets == "all-linear" or any(re.fullmatch(targets, n) for n in names) else [targets]
        else:  # a list matches a module by full name or by dotted suffix
            missing = sorted(t for t in targets or [] if not any(n == t or n.endswith("." + t) for n in names))
        if missing:
            raise SafetyPatchError(f"{patch.path}/adapter_config.json targets modules the model lacks: {', '.join(missing)}")
        _check_lora_shapes(patch, model)  # not waived by force: a LoRA of another shape cannot load at all
        if patch.gated:
            _check_gate_fits(patch, model)
    else:
        from safetensors import safe_open

        params = dict(model.named_parameters())
        with safe_open(str(patch.path / DELTA_FILE), framework="pt") as f:
            for k in f.keys():
                if k not in params:
                    raise SafetyPatchError(f"{patch.path}/{DELTA_FILE}: tensor {k} has no parameter in the model")
                shape = tuple(f.get_slice(k).get_shape())
                if shape != tuple(params[k].shape):
                    raise SafetyPatchError(f"{patch.path}/{DELTA_FILE}: {k} has shape {shape}, model has {tuple(params[k].shape)}")
        if patch.gated:  # a gated delta (gate.folder.apply_gate): its gate must fit the model too
            _check_gate_fits(patch, model)
    if problems and not force:
        raise SafetyPatchError(f"{problems[0]}; {remedy}")
    for p in problems:
        log.warning("warning: %s (forced)", p)
    return problems


def _update_key(p: Patch) -> tuple:
    """What a patch changes, by content: its format and its weight files' sha256 (not the gate's)."""
    return (p.format, *(p.meta["files"].get(f) for f in weight_files(p.format)))


def _check_stack_order(patches: Sequence[Patch], force: bool) -> None:
    """Each patch once (by id: a copy in another folder is the same patch; by update: a patch and a
    gated copy of it hold the same weights), and each after the
    patches it was trained on top of (``stack``; ``force`` skips only the order). Raises
    SafetyPatchError naming both folders of a repeated patch: attached twice, its update would be
    applied twice (a LoRA's ΔW doubled, a delta added twice), a model no one trained or measured."""
    first: dict[str, Path] = {}
    update: dict[tuple, Patch] = {}
    for p in patches:
        if p.id in first:
            raise SafetyPatchError(f"patch {p.id} is given twice ({first[p.id]} and {p.path}): attached twice, its update "
                                   "would apply twice; give each patch once")
        first[p.id] = p.path
        # Another id, the same update: a patch and its `gate apply` copy (or a re-gated one) differ only
        # in the gate, and attached together the update applies twice wherever the gate fires.
        key = _update_key(p)
        if key in update:
            q = update[key]
            raise SafetyPatchError(f"patches {q.path} ({q.id}) and {p.path} ({p.id}) hold the same update (identical "
                                   f"{' and '.join(weight_files(p.format))}; one is the other behind a gate): attached "
                                   "together, it would apply twice; give one of them")
        update[key] = p
    seen: list[str] = []
    for p in patches:
        missing = [s for s in p.stack if s not in seen]
        if missing and not force:
            raise SafetyPatchError(
                f"patch {p.path} was trained on top of patch(es) {', '.join(missing)}; put those before it in the stack, in "
                f"order (`--patch` each of them first; `patch gate` and `patch verify` take them as `--stack`; where a "
                f"command takes --force, that skips this check)"
            )
        seen.append(p.id)


def item_names(patches: Sequence[Patch]) -> list[str]:
    """Each patch's routing name in a stack, in stack order: LoRA adapters ``patch0``, ``patch1``, …
    (PEFT adapter names) and weight deltas ``delta0``, …, each numbered among its own kind. The
    keys of ``PatchedModel.gates`` and of the gate logits that ``generate`` and ``eval`` record."""
    counts = {"lora": 0, "delta": 0}
    out = []
    for p in patches:
        out.append(f"{'patch' if p.format == 'lora' else 'delta'}{counts[p.format]}")
        counts[p.format] += 1
    return out


_WARNED: set[tuple[str, ...]] = set()


def _warn_gate_reads_unfit_stack(patches: Sequence[Patch]) -> None:
    """Log a warning for each gated patch stacked with an always-on patch its gate was not fit with.

    A gate reads the hidden states of the base with the stack's ungated patches on
    (``PatchedModel.gate_scores``); it was fit on the states of its base plus the patches it was
    trained on top of (``stack``). Any other always-on patch shifts what it reads, so its routing
    (and its threshold's false-positive rate) is unmeasured there: the stack still attaches (the
    warning says to measure it with ``eval``/``gate eval``), since users stack an anchor patch below
    a gated one on purpose."""
    ungated = [p for p in patches if not p.gated]
    for p in patches:
        if not p.gated:
            continue
        unfit = [q for q in ungated if q.id not in p.gate_fit_stack]
        key = (p.id, *(q.id for q in unfit))
        if unfit and key not in _WARNED:  # once per process: a server re-attaches its stacks as requests switch
            _WARNED.add(key)
            log.warning("warning: the gate of %s was fit without the always-on patch(es) %s, which change the hidden "
                        "states it reads: its routing in this stack is unmeasured (measure it: `safety-patch eval ... "
                        "--patch` this stack; its routing table shows where the gate fires)",
                        p.path, ", ".join(str(q.path) for q in unfit))


def stack_key(patches: Sequence[Patch]) -> str:
    """Identity of an attached stack, for caches: ids in order."""
    return "+".join(p.id for p in patches)


def _check_lora_loaded(peft_model, adapter: str, patch: Patch) -> None:
    """Every tensor of the adapter file was loaded into a LoRA layer, and every injected layer got its tensors.

    PEFT only warns about (or returns) missing and unexpected keys; an adapter whose tensor
    names match nothing attaches as a silent no-op. Raises SafetyPatchError naming the first
    tensor that loaded nowhere, or the first injected LoRA weight the file did not provide.
    """
    import re

    from safetensors import safe_open

    path = patch.path / LORA_FILES[1]
    with safe_open(str(path), framework="pt") as f:
        in_file = set(f.keys())
    seg = re.compile(rf"\.{re.escape(adapter)}(?=\.|$)")
    in_model = {seg.sub("", n, count=1) for n, _ in peft_model.named_parameters() if "lora_" in n and seg.search(n)}
    unused = sorted(in_file - in_model)
    if unused:
        raise SafetyPatchError(f"{path}: tensor {unused[0]} matched no LoRA layer PEFT injected "
                               f"({len(unused)} of {len(in_file)} tensors unused; check target_modules and module paths)")
    lacking = sorted(in_model - in_file)
    if lacking:
        raise SafetyPatchError(f"{path}: the adapter's target_modules inject {lacking[0]}, which the file does not hold "
                               f"({len(lacking)} LoRA weights would stay at their initial values)")


_ATTACHED: weakref.WeakSet = weakref.WeakSet()
# model -> ids of the patches already merged into its weights (from the checkpoint's merged_from.json)
_MERGED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # keys: patch ids and _update_key tuples


def note_merged(model: torch.nn.Module, folder: Path, fingerprint: str | None = None) -> None:
    """Remember which patches ``folder`` (a checkpoint ``model`` was loaded from) has merged into its
    weights, so that ``attached`` refuses them, --force or not.

    ``fingerprint``: the loaded model's. Where merged_from.json records the checkpoint's own
    fingerprint (merges since 2026-12-04) and the model was loaded at a dtype that holds the saved
    weights exactly (the saved dtype, or float32), they must be equal: other weights under this
    record (a folder whose weight files were replaced or edited after the merge) would be described
    by a list of merged patches that is not theirs. Raises SafetyPatchError for that, and for a
    merged_from.json that is not a JSON object with a list of patches."""
    f = Path(folder) / "merged_from.json"
    if not f.is_file():
        return
    from .patch_schema import _load_json_object

    rec = _load_json_object(f)
    if not isinstance(rec.get("patches", []), list):
        raise SafetyPatchError(f"{f}: field 'patches' must be a list")
    want, saved = rec.get("fingerprint"), rec.get("dtype")
    loaded = str(next(model.parameters()).dtype).removeprefix("torch.")
    if fingerprint is not None and isinstance(want, str) and loaded in (saved, "float32") and fingerprint != want:
        raise SafetyPatchError(f"{folder}: these weights are not the ones `patch merge` wrote (merged_from.json records "
                               f"fingerprint {want[:12]}…, they hash to {fingerprint[:12]}…): its record of merged "
                               "patches does not describe them; merge again, or remove merged_from.json if the "
                               "weights were changed on purpose")
    entries = [q for q in rec.get("patches", []) if isinstance(q, dict)]
    # by id, and by update (merges since 2026-12-04): a gated copy of a merged patch has another id
    _MERGED[model] = {q["id"]: str(f) for q in entries if q.get("id")} | {
        tuple(q["update"]): str(f) for q in entries if isinstance(q.get("update"), list)}
"""Models with a stack attached now (``attached``): a second stack on top is refused."""


@contextlib.contextmanager
def attached(model: torch.nn.Module, patches: Sequence[str | Path | Patch], fingerprint: str | None = None,
             force: bool = False) -> Iterator[PatchedModel]:
    """Attach patches for the duration of the block; yields the :class:`~safety_patch.patched.PatchedModel`.

    Delta patches are added to the weights (originals kept and restored exactly); LoRA
    adapters are injected with PEFT and all activated together. A gated patch (LoRA or delta)
    is routed per prompt by whoever generates or scores through the PatchedModel; a forward
    pass that bypasses its routing raises. On exit the base is restored bit-for-bit, even
    after an exception. Raises SafetyPatchError for a patch that does not fit ``model``.
    """
    from .gate.probe import Gate
    from .patched import PatchedModel, _DeltaState

    if model in _ATTACHED:  # checked first: the wrapped modules would fail verify with a misleading message
        raise SafetyPatchError("a patch stack is already attached to this model: attach all patches in one "
                               "attached() call (they stack in order), or leave the first block before the next")
    ps = [check_unchanged(p) if isinstance(p, Patch) else read_patch(p) for p in patches]
    merged = _MERGED.get(model, {})
    for p in ps:
        if p.id in merged:  # not waived by --force: its update is in these weights already
            raise SafetyPatchError(f"patch {p.id} ({p.path}) is already merged into this model ({merged[p.id]} lists it): "
                                   "attaching it again would apply its update twice")
        if _update_key(p) in merged:
            raise SafetyPatchError(f"patch {p.id} ({p.path}) holds the same update (identical weight files) as a patch "
                                   f"already merged into this model ({merged[_update_key(p)]} lists it; one is the "
                                   "other behind a gate): attaching it would apply that update twice")
    for p in ps:
        verify(p, model, fingerprint, force)
    _check_stack_order(ps, force)
    _warn_gate_reads_unfit_stack(ps)
    loras = [p for p in ps if p.format == "lora"]
    deltas = [p for p in ps if p.format == "delta"]
    names = {id(p): n for p, n in zip(ps, item_names(ps), strict=True)}
    gates = {names[id(p)]: Gate.load(p.path) for p in ps if p.gated}
    keep_deltas = any(p.gated for p in deltas)  # a gated delta is switched per prompt group: keep its tensors
    saved: dict[str, torch.Tensor] = {}
    delta_items: list[tuple[str, dict[str, torch.Tensor], bool]] = []
    peft_model = None
    hook = None
    _ATTACHED.add(model)
    try:
        if deltas:
            from safetensors import safe_open

            params = dict(model.named_parameters())
            with torch.no_grad():
                for p in deltas:
                    kept: dict[str, torch.Tensor] = {}
                    with safe_open(str(p.path / DELTA_FILE), framework="pt") as f:
                        for k in f.keys():
                            w = params[k]
                            if k not in saved:
                                saved[k] = w.detach().clone()
                            d = f.get_tensor(k)
                            w.add_(d.to(device=w.device, dtype=torch.float32).to(w.dtype))
                            if keep_deltas:
                                kept[k] = d
                    delta_items.append((names[id(p)], kept, p.gated))
        module = model
        if loras:
            from peft import PeftModel

            adapter_names = [names[id(p)] for p in loras]
            peft_model = PeftModel.from_pretrained(model, str(loras[0].path), adapter_name=adapter_names[0])
            for name, p in zip(adapter_names[1:], loras[1:], strict=True):
                peft_model.load_adapter(str(p.path), adapter_name=name)
            for name, p in zip(adapter_names, loras, strict=True):
                _check_lora_loaded(peft_model, name, p)
            peft_model.base_model.set_adapter(adapter_names)  # all active at once: their updates add
            peft_model.eval()
            module = peft_model
        state = None
        if keep_deltas:
            state = _DeltaState(dict(model.named_parameters()), saved, delta_items,
                                frozenset(n for n, _, g in delta_items if g))
        for p in ps:  # nothing changed while the files were loaded either
            if _file_stats(p.path) != p.stats:
                raise SafetyPatchError(f"{p.path} changed on disk while it was being attached; nothing was applied")
        pm = PatchedModel(module, fingerprint, tuple(ps), tuple(names[id(p)] for p in loras),
                          tuple(names[id(p)] for p in ps), gates, state)
        if gates:  # fail closed: a pass that no route opened (a direct call on the module) raises
            hook = model.register_forward_pre_hook(pm.guard_hook, with_kwargs=True)
        yield pm
    finally:
        if hook is not None:
            hook.remove()
        # A stack held for the process (attach_for_inference) is closed here by the garbage
        # collector when the interpreter shuts down: nothing will run the model again, and PEFT's
        # unload opens a tqdm bar whose monitor thread can never start at that point, so the
        # process would hang at exit (`chat --patch` did, 2026-12-02).
        if peft_model is not None and not sys.is_finalizing():
            restored = peft_model.unload()  # removes LoRA layers, puts the original Linear modules back
            assert restored is model
        if saved and not sys.is_finalizing():
            params = dict(model.named_parameters())
            with torch.no_grad():
                for k, w in saved.items():
                    params[k].copy_(w)
        _ATTACHED.discard(model)


def attach_for_inference(lm, patches: Sequence[str | Path | Patch], force: bool = False) -> PatchedModel:
    """Attach patches to a LoadedModel's base for the rest of the process (CLI use); returns the PatchedModel."""
    ps = [p if isinstance(p, Patch) else read_patch(p) for p in patches]
    ctx = attached(lm.model, ps, lm.fingerprint, force)
    pm = ctx.__enter__()
    pm._exit = ctx  # held by the value: the attachment lives as long as it does (or until pm.close())
    return pm


PROBE_TEXT = "The capital of France is Paris. def add(a, b):\n    return a + b  # How do I stay safe online?"


def _probe_ids(model: torch.nn.Module, tokenizer) -> torch.Tensor:
    """A short fixed probe batch [1, T] on the model's device: prose, code and a question."""
    ids = tokenizer(PROBE_TEXT, return_tensors="pt")["input_ids"]
    return ids.to(next(model.parameters()).device)


@torch.no_grad()
def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float().cpu()


def probe_effect(model: torch.nn.Module, tokenizer, patches: Sequence[Patch], fingerprint: str | None,
                 force: bool = False, below: Sequence[Patch] = ()) -> float:
    """max |logit(attached) - logit(base)| on a fixed probe batch; raises if the patches change nothing.

    ``below``: patches attached under ``patches`` on both sides (the stack a patch was trained on
    top of): the difference is then what ``patches`` add to that stack. A gated patch is measured
    with its adapter on (the gate decides when it applies, not what it does). Raises
    SafetyPatchError if the difference is zero (a patch that does not apply) or the patched
    logits are not finite.
    """
    ids = _probe_ids(model, tokenizer)
    if below:
        with attached(model, below, fingerprint, force) as pm, pm.all_on() as m:
            base = _logits(m, ids)
    else:
        base = _logits(model, ids)
    with attached(model, [*below, *patches], fingerprint, force) as pm, pm.all_on() as m:
        patched = _logits(m, ids)
    if not bool(torch.isfinite(patched).all()):
        raise SafetyPatchError(f"{patches[0].path}: the patched model's logits are not finite on a probe batch")
    diff = float((patched - base).abs().max())
    if diff == 0.0:
        raise SafetyPatchError(f"{patches[0].path}: attaching the patch does not change the model's logits on a probe "
                               "batch (it does not apply)")
    return diff


def probe_routing(model: torch.nn.Module, tokenizer, patch: Patch, fingerprint: str | None,
                  n: int = 64) -> dict[str, tuple[int, int]]:
    """Where a gated ``patch``'s gate sends fixed probe prompts: {"harmful": (fired, n), "general":
    (fired, n)} over the 129 hand-written harmful requests of 22 harm categories
    (resources/gate_harmful_prompts.tsv: a gate for one kind of harm still meets its kind) and the
    first ``n`` single-turn general instructions (resources/general_prompts.tsv). A smoke
    test of the gate as routed, not an evaluation (the harmful ones are in the default gate's
    training pool; `gate eval` measures on held-out sets). Raises SafetyPatchError when the gate
    fires on none of the harmful ones: the patch would never apply (fail closed)."""
    from .data.prompts import gate_harmful_prompts, general_prompts
    from .generation import conversation, render

    sets = {"harmful": [r["prompt"] for r in gate_harmful_prompts()],
            "general": [c["messages"][0]["content"] for c in general_prompts() if len(c["messages"]) == 1][:n]}
    out = {}
    with attached(model, [patch], fingerprint, force=True) as pm:  # the binding was checked by verify()
        for name, texts in sets.items():
            ids = [tokenizer(render(tokenizer, conversation(t)), add_special_tokens=False)["input_ids"] for t in texts]
            on = pm.routes(tokenizer, ids)
            out[name] = (sum(bool(r) for r in on), len(texts))
    if out["harmful"][0] == 0:
        raise SafetyPatchError(f"{patch.path}: the gate fires on none of {out['harmful'][1]} clearly harmful probe "
                               "requests: the patch would never apply (fail closed); fit the gate again")
    return out


def tied_targets(model: torch.nn.Module, patches: Sequence[Patch]) -> list[tuple[Patch, str, str]]:
    """(patch, adapted module, the tensor its weight is shared with) for every LoRA target whose
    weight another parameter shares (lm_head tied to embed_tokens): such a patch attaches exactly
    but cannot be merged (:func:`merge_to_checkpoint`) or exported for an engine that merges."""
    from safetensors import safe_open

    owners: dict[int, list[str]] = {}
    for n, prm in model.named_parameters(remove_duplicate=False):
        owners.setdefault(prm.data_ptr(), []).append(n)
    params = dict(model.named_parameters(remove_duplicate=False))
    out = []
    for p in patches:
        if p.format != "lora":
            continue
        with safe_open(str(p.path / LORA_FILES[1]), framework="pt") as f:
            modules = sorted({_lora_module(k)[0] for k in f.keys()})
        for name in modules:
            w = params.get(f"{name}.weight")
            shared = [o for o in owners.get(w.data_ptr(), []) if o != f"{name}.weight"] if w is not None else []
            if shared:
                out.append((p, name, shared[0]))
    return out


def _refuse_tied_targets(model: torch.nn.Module, patches: Sequence[Patch]) -> None:
    """Refuse to merge a LoRA into a weight shared with another tensor (lm_head tied to embed_tokens).

    Folding ΔW into a tied weight changes every module that shares it (the input embeddings
    too), so the merged checkpoint would not be the attached model.
    """
    if tied := tied_targets(model, patches):
        p, name, shared = tied[0]
        raise SafetyPatchError(
            f"{p.path}: adapts {name}, whose weight is shared with {shared} (tied embeddings); merging would "
            "change both, so the merged model would differ from the attached one. Attach the patch instead")


def merged_state_dict(model: torch.nn.Module, patches: Sequence[Patch], fingerprint: str | None, force: bool = False) -> dict:
    """The base state dict with every patch folded in; the live model is left untouched.

    LoRA deltas come from PEFT's ``get_delta_weight`` (fp32) and are added to copies, so no
    merge/unmerge round trip perturbs the base weights.
    """
    patches = [p if isinstance(p, Patch) else read_patch(p) for p in patches]
    gated = [str(p.path) for p in patches if p.gated]
    if gated:
        raise SafetyPatchError(
            f"{gated[0]} is a gated patch: its adapter applies only to prompts its gate flags, so it cannot be folded "
            "into the weights (nor trained on top of); attach it instead")
    _refuse_tied_targets(model, patches)
    with attached(model, patches, fingerprint, force) as pm:
        m = pm.module
        sd = {k.replace(".base_layer.", "."): v.detach().clone()
              for k, v in model.state_dict().items() if "lora_" not in k}
        if m is not model:
            from peft.tuners.lora import LoraLayer

            for name, mod in m.named_modules():
                if isinstance(mod, LoraLayer):
                    key = name.removeprefix("base_model.model.") + ".weight"
                    w = sd[key]
                    total = sum(mod.get_delta_weight(a).float() for a in mod.active_adapters if a in mod.lora_A)
                    sd[key] = (w.float() + total).to(w.dtype)
    return sd


def merge_to_checkpoint(lm, patches: Sequence[str | Path], out: str | Path, force: bool = False,
                        overwrite: bool = False) -> Path:
    """Export the base with patches folded in as a standard Hugging Face checkpoint (atomically).

    ``overwrite``: replace ``out`` if it is a merged checkpoint safety-patch wrote (``merged_from.json``),
    in one atomic swap; any other existing folder is refused (SafetyPatchError), as is an existing
    ``out`` without it."""
    from .atomic import atomic_dir, write_json
    from .outputs import looks_like

    out = Path(out)
    if out.exists() and not (overwrite and out.is_dir() and looks_like(out, "merged")):
        raise SafetyPatchError(f"{out} exists; merge writes a new folder (remove it, choose another path, or pass "
                               "--overwrite to replace a merged checkpoint safety-patch wrote)")
    ps = [read_patch(p) for p in patches]
    prior = _merged_from(lm)
    again = [p for p in ps if p.id in {q.get("id") for q in prior.get("patches", [])}]
    if again:  # not waived by --force: its update is in these weights already
        raise SafetyPatchError(f"patch {again[0].id} ({again[0].path}) is already merged into {lm.path} (its "
                               "merged_from.json lists it): folding it in again would apply its update twice")
    sd = merged_state_dict(lm.model, ps, lm.fingerprint, force)
    ids = _probe_ids(lm.model, lm.tokenizer)
    base = _logits(lm.model, ids)
    with attached(lm.model, ps, lm.fingerprint, force) as pm:
        want = _logits(pm, ids)
    backup = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    try:
        lm.model.load_state_dict(sd, strict=False)
        # The checkpoint must be the attached model: check on a probe batch before anything is written.
        got = _logits(lm.model, ids)
        err, effect = float((got - want).abs().max()), float((want - base).abs().max())
        atol = 1e-3 if next(lm.model.parameters()).dtype == torch.float32 else 0.1
        if not err <= max(0.1 * effect, atol):  # `not <=`: a NaN difference refuses too
            raise SafetyPatchError(
                f"merged weights do not reproduce the attached patch(es): max |logit diff| {err:.4g} on a probe batch "
                f"(the patches' own effect: {effect:.4g}); nothing written to {out}")
        from .fingerprint import fingerprint

        merged = {"fingerprint": fingerprint(lm.model, lm.tokenizer),  # what patches trained on it bind to
                  "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch.")}
        with atomic_dir(out, overwrite=overwrite, kind="merged") as tmp:
            lm.model.save_pretrained(str(tmp), safe_serialization=True)
            lm.tokenizer.save_pretrained(str(tmp))
            write_json(tmp / "merged_from.json", _merge_record(lm, ps, prior, merged))
    finally:
        lm.model.load_state_dict(backup)
    return out


def _merged_from(lm) -> dict:
    """The ``merged_from.json`` of the checkpoint ``lm`` was loaded from ({} for any other model).
    Raises SafetyPatchError naming the file when it is not a JSON object."""
    from .patch_schema import _load_json_object

    f = Path(lm.path) / "merged_from.json" if lm.path else None
    if f is None or not f.is_file():
        return {}
    rec = _load_json_object(f)
    if not isinstance(rec.get("patches", []), list):
        raise SafetyPatchError(f"{f}: field 'patches' must be a list")
    return rec


def _merge_record(lm, ps: Sequence[Patch], prior: dict, merged: dict) -> dict:
    """``merged_from.json``: the original base (through any earlier merges: ``prior``, the loaded
    checkpoint's own record), every patch folded in so far in order, the checkpoint merged into
    (``merged_into``, where it was itself a merge), the written checkpoint's own ``fingerprint``
    and the ``dtype`` it was saved in (``merged``; checked when it is loaded: ``note_merged``), and
    provenance (code, library versions, time)."""
    import time

    from .provenance import code_identity, library_versions

    this = {"name": lm.name, "fingerprint": lm.fingerprint}
    return {"base": prior.get("base") or this,
            **({"merged_into": this} if prior else {}),
            "fingerprint": merged["fingerprint"], "dtype": merged["dtype"],
            "patches": [*prior.get("patches", []),
                        *({"path": str(p.path), "id": p.id, "update": list(_update_key(p))} for p in ps)],
            "code": code_identity(), "versions": library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _lora_config(meta: dict) -> dict:
    """The LoRA settings of a patch.json's ``config``: its ``lora`` group, or (patches trained before
    the config had groups) the flat config itself."""
    config = meta.get("config") or {}
    return config["lora"] if isinstance(config.get("lora"), dict) else config


def _tensor_count(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return len(list(f.keys()))


def info(patch: Patch) -> dict:
    m = patch.meta
    t = m.get("training", {})
    return {"path": str(patch.path), "id": patch.id, "format": patch.format, "method": m.get("method"),
            "objective": m.get("objective"), "base": m.get("base", {}).get("name"),
            "base_fingerprint": patch.base_fingerprint, "stack": patch.stack,
            # a delta has no rank: its config still holds the LoRA group's defaults, which say nothing of it
            # layers: None is every layer; a --layers patch must not read as an all-layer one
            **({"rank": _lora_config(m).get("rank"), "target_modules": _lora_config(m).get("target_modules"),
                "layers": _lora_config(m).get("layers") or "all"}
               if patch.format == "lora" else {"changed_tensors": _tensor_count(patch.path / DELTA_FILE)}),
            "trainable_parameters": t.get("trainable_parameters"), "steps": t.get("steps"),
            "tokens_seen": t.get("tokens_seen"), "wall_seconds": t.get("wall_seconds"),
            "data_manifest_sha256": m.get("data", {}).get("manifest_sha256"), "created": m.get("created"),
            **_gate_info(m.get("gate")), "files": m.get("files"),
            "record": "sealed (record_sha256: every field above is as written)" if patch.sealed else
                      "not sealed (written before 2026-12-03): the weight files, base, stack and gate are bound; "
                      "descriptive fields (config, training, the gate's validation report) are as found"}


def _gate_info(g: dict | None) -> dict:
    """A gated patch's gate in a few lines (``patch info``): layers and threshold with where the threshold
    came from, the pool it was fit on, and what it fired on per validation set; the whole record
    (validation report, leave-one-family-out, prompt counts) stays in patch.json."""
    if not g:
        return {"gate": None}
    layers = [g.get("layer"), *g.get("extra_layers", [])]
    out = {"gate": f"layer{'s' * (len(layers) > 1)} {', '.join(map(str, layers))}, threshold {g.get('threshold', 0):+.3f}"
                   + (f", id {g['id']}" if g.get("id") else "")}
    tf = g.get("threshold_from") or {}
    if tf.get("target_fpr") is not None:
        out["gate_threshold_from"] = (f"{tf['target_fpr']:.0%} of {tf.get('pool', 'validation benign prompts')} fire"
                                      + (f", raised {tf['raised_by']:+.3f} for family_fpr {tf['family_fpr']:g}"
                                         if tf.get("raised_by") else ""))
    if g.get("harmful") is not None:
        out["gate_fit_on"] = f"{g['harmful']} harmful / {g.get('benign')} benign prompts"
    fired = ((g.get("validation") or {}).get("fired")) or {}
    if fired:
        out["gate_fires_on"] = ", ".join(f"{k} {v['value']:.1%} ({v['k']}/{v['n']})" for k, v in fired.items()
                                         if v.get("n")) + f" ({(g.get('validation') or {}).get('split', 'val')} split)"
    from .gate.folder import check_protects

    # what `train` and `gate fit` warned of once, shown for as long as the patch exists
    said = check_protects(g, "patch.json 'gate'", warn=False)
    if said:
        out["gate_warning"] = said
    return out
