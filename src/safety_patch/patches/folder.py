"""A patch folder: its files, ``patch.json``, and the one reader that checks them (``read_patch``).

What a folder must hold, how it is checked (schema, hashes, id, binding, tensors, the gate), how
``patch.json`` is written (``finalize_patch``) and what ``patch info`` shows. Attaching is
``patches.attach``; merging into a checkpoint ``patches.merge``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import interrupted_note, sha256_file
from ..errors import SafetyPatchError

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
    from ..gate.probe import GATE_FILE

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
    from ..gate.probe import GATE_FILE, Gate
    from ..patch_schema import binding_digest, patch_id, read_adapter_config, read_manifest, record_digest

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
        from ..gate.folder import check_protects

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
    from ..gate.probe import GATE_FILE

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


def canonical_adapter_config(config: dict) -> dict:
    """``adapter_config.json``'s content with its set-valued fields in one order: PEFT keeps
    ``target_modules`` as a Python set and writes it in the set's iteration order, which string
    hashing randomises per process, so one training run written twice gave two files, two patch
    ids and two update keys (a user's trial: the same adapter then passed the "already merged"
    check). Sorted lists; everything else as given."""
    out = dict(config)
    for key in ("target_modules", "modules_to_save", "exclude_modules"):
        if isinstance(out.get(key), list) and all(isinstance(v, str) for v in out[key]):
            out[key] = sorted(out[key])
    return out


def canonical_adapter_sha256(path: Path) -> str:
    """sha256 of an ``adapter_config.json`` in canonical form (:func:`canonical_adapter_config`,
    keys sorted): equal for files that differ only in those fields' order. Raises SafetyPatchError
    naming the file when it is not a JSON object."""
    import hashlib

    from ..patch_schema import load_json_object

    cfg = canonical_adapter_config(load_json_object(path))
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


def finalize_patch(folder: Path, fmt: str, base: dict, **fields) -> dict:
    """Write ``patch.json`` into a folder that already holds the weight files; returns it.

    A LoRA's ``adapter_config.json`` is first rewritten in canonical form (sorted
    ``target_modules``: :func:`canonical_adapter_config`), so that the same adapter gets the same
    patch id whichever process wrote it. The finished folder is then read back with
    ``read_patch``, so a patch with non-finite or all-zero weights, a degenerate gate or metadata
    off the schema is an error at write time (SafetyPatchError; patch.json is removed again, so
    the folder is not a patch).
    """
    import time

    from .. import __version__
    from ..atomic import write_json
    from ..patch_schema import binding_digest, load_json_object, patch_id, record_digest
    from ..provenance import code_identity

    if fmt == "lora" and (folder / LORA_FILES[0]).is_file():
        cfg = load_json_object(folder / LORA_FILES[0])
        if (canonical := canonical_adapter_config(cfg)) != cfg:
            write_json(folder / LORA_FILES[0], canonical)
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
    write_json(folder / PATCH_JSON, meta)
    try:
        read_patch(folder)
    except SafetyPatchError:
        (folder / PATCH_JSON).unlink(missing_ok=True)
        raise
    return meta


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


def gate_summary(g: dict) -> list[str]:
    """Lines on a gated patch's gate (patch.json's ``gate``): first its layers, threshold, the pool it
    was fit on and what it fired on per validation set; then each warning its record gives
    (``gate.folder.check_protects``), one line each, starting ``warning:``. ``serve`` prints them at
    start, so whoever runs a gated patch sees how often its gate was measured to open, a quick-size
    gate included. (Warnings inside the first line ran together: a user's trial read two as one.)"""
    info = _gate_info(g)
    parts = [info["gate"]]
    if info.get("gate_fit_on"):
        parts.append(f"fit on {info['gate_fit_on']}")
    parts.append(f"fires on {info['gate_fires_on']}" if info.get("gate_fires_on") else "no validation report recorded")
    warnings = [" ".join(w.split()) for w in str(info.get("gate_warning") or "").splitlines() if w.strip()]
    return ["; ".join(parts), *warnings]


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
    from ..gate.folder import check_protects

    # what `train` and `gate fit` warned of once, shown for as long as the patch exists
    said = check_protects(g, "patch.json 'gate'", warn=False)
    if said:
        out["gate_warning"] = said
    return out
