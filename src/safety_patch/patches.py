"""Patches: a LoRA adapter or a weight delta, plus ``patch.json``; attach, detach, stack, merge.

A patch folder holds either

* ``adapter_config.json`` + ``adapter_model.safetensors``: a standard PEFT LoRA adapter that
  ``PeftModel.from_pretrained`` and vLLM's LoRA loader accept unchanged, or
* ``delta.safetensors``: W_ft - W0 (fp32) of every tensor a full-parameter run changed,

and ``patch.json``: what made it (base fingerprint, method, hyper-parameters, data hash,
costs, versions) and the sha256 of its weight files. A *gated* LoRA patch also holds
``gate.safetensors`` (gate.py): a probe on the prompt that decides, per prompt, whether the
adapter applies. Gated patches attach, stack and evaluate like any other; they cannot be
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
import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .atomic import sha256_file
from .errors import SafetyPatchError

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

    @property
    def base_fingerprint(self) -> str:
        return self.meta.get("base", {}).get("fingerprint", "")

    @property
    def stack(self) -> list[str]:
        return list(self.meta.get("stack", []))

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def gated(self) -> bool:
        return bool(self.meta.get("gate"))


def weight_files(fmt: str, gated: bool = False) -> tuple[str, ...]:
    from .gate import GATE_FILE

    return (LORA_FILES + ((GATE_FILE,) if gated else ())) if fmt == "lora" else (DELTA_FILE,)


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


def read_patch(path: str | Path, check_hashes: bool = True) -> Patch:
    """Open and validate a patch folder (patch.json, weight files, hashes, no pickles)."""
    path = Path(path)
    if not path.is_dir():
        raise SafetyPatchError(f"patch folder not found: {path}")
    pj = path / PATCH_JSON
    if not pj.is_file():
        raise SafetyPatchError(f"{path} has no {PATCH_JSON}: not a safety-patch patch (or an unfinished run)")
    try:
        meta = json.loads(pj.read_text(encoding="utf-8"))
    except ValueError as e:
        raise SafetyPatchError(f"{pj}: invalid JSON ({e})") from None
    if meta.get("kind") != "safety-patch/patch" or meta.get("format") not in ("lora", "delta"):
        raise SafetyPatchError(f"{pj}: not a safety-patch patch manifest (kind/format missing)")
    pickles = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise SafetyPatchError(f"{path} contains pickle files ({', '.join(pickles)}); only safetensors are loaded")
    fmt = meta["format"]
    if meta.get("gate") and fmt != "lora":
        raise SafetyPatchError(f"{pj}: only LoRA patches can be gated")
    files = weight_files(fmt, bool(meta.get("gate")))
    for f in files:
        if not (path / f).is_file():
            raise SafetyPatchError(f"{path} is missing {f}")
    for f in files:
        if f.endswith(".safetensors"):
            _check_safetensors(path / f)
        if check_hashes:
            want = meta.get("files", {}).get(f)
            if want and sha256_file(path / f) != want:
                raise SafetyPatchError(f"{path / f}: sha256 differs from {PATCH_JSON} (file changed or damaged)")
    pid = meta.get("id") or hashlib.sha256(json.dumps(meta.get("files", {}), sort_keys=True).encode()).hexdigest()[:16]
    return Patch(path, meta, fmt, pid)


def finalize_patch(folder: Path, fmt: str, base: dict, **fields) -> dict:
    """Write ``patch.json`` into a folder that already holds the weight files; returns it."""
    import time

    from . import __version__

    files = {f: sha256_file(folder / f) for f in weight_files(fmt, bool(fields.get("gate")))}
    meta = {
        "kind": "safety-patch/patch",
        "format": fmt,
        "id": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:16],
        "base": base,
        "stack": [],
        **fields,
        "files": files,
        "safety_patch_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    from .atomic import write_json

    write_json(folder / PATCH_JSON, meta)
    return meta


def _module_names(model: torch.nn.Module) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def verify(patch: Patch, model: torch.nn.Module, fingerprint: str | None, force: bool = False) -> list[str]:
    """Check a patch against a model; returns warnings (with ``force``) or raises."""
    problems = []
    if fingerprint is not None and patch.base_fingerprint and patch.base_fingerprint != fingerprint:
        problems.append(
            f"patch {patch.path} was made for base {patch.base_fingerprint[:12]}…, but the model is {fingerprint[:12]}… "
            f"({patch.meta.get('base', {}).get('name', '?')} vs this model)"
        )
    if patch.format == "lora":
        cfg = json.loads((patch.path / "adapter_config.json").read_text())
        targets = cfg.get("target_modules")
        names = _module_names(model)
        if isinstance(targets, str):  # PEFT: a string is a regex matched against full module names
            import re

            missing = [] if targets == "all-linear" or any(re.fullmatch(targets, n) for n in names) else [targets]
        else:  # a list matches a module by full name or by dotted suffix
            missing = sorted(t for t in targets or [] if not any(n == t or n.endswith("." + t) for n in names))
        if missing:
            raise SafetyPatchError(f"{patch.path}/adapter_config.json targets modules the model lacks: {', '.join(missing)}")
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
    if problems and not force:
        raise SafetyPatchError(problems[0] + "; pass --force to attach anyway")
    for p in problems:
        log.warning("warning: %s (forced)", p)
    return problems


def _check_stack_order(patches: Sequence[Patch], force: bool) -> None:
    seen: list[str] = []
    for p in patches:
        missing = [s for s in p.stack if s not in seen]
        if missing and not force:
            raise SafetyPatchError(
                f"patch {p.path} was trained on top of patch(es) {', '.join(missing)}; attach those first (or --force)"
            )
        seen.append(p.id)


def stack_key(patches: Sequence[Patch]) -> str:
    """Identity of an attached stack, for caches: ids in order."""
    return "+".join(p.id for p in patches)


@contextlib.contextmanager
def attached(model: torch.nn.Module, patches: Sequence[str | Path | Patch], fingerprint: str | None = None,
             force: bool = False) -> Iterator[torch.nn.Module]:
    """Attach patches for the duration of the block; yields the model to call.

    Delta patches are added to the weights (originals kept and restored exactly); LoRA
    adapters are injected with PEFT and all activated together. On exit the base is
    restored bit-for-bit, even after an exception.
    """
    ps = [p if isinstance(p, Patch) else read_patch(p) for p in patches]
    for p in ps:
        verify(p, model, fingerprint, force)
    _check_stack_order(ps, force)
    from .gate import Gate

    gates = {f"patch{i}": Gate.load(p.path) for i, p in enumerate(x for x in ps if x.format == "lora") if p.gated}
    saved: dict[str, torch.Tensor] = {}
    peft_model = None
    try:
        deltas = [p for p in ps if p.format == "delta"]
        if deltas:
            from safetensors import safe_open

            params = dict(model.named_parameters())
            with torch.no_grad():
                for p in deltas:
                    with safe_open(str(p.path / DELTA_FILE), framework="pt") as f:
                        for k in f.keys():
                            w = params[k]
                            if k not in saved:
                                saved[k] = w.detach().clone()
                            w.add_(f.get_tensor(k).to(device=w.device, dtype=torch.float32).to(w.dtype))
        loras = [p for p in ps if p.format == "lora"]
        if loras:
            from peft import PeftModel

            names = [f"patch{i}" for i in range(len(loras))]
            peft_model = PeftModel.from_pretrained(model, str(loras[0].path), adapter_name=names[0])
            for name, p in zip(names[1:], loras[1:], strict=True):
                peft_model.load_adapter(str(p.path), adapter_name=name)
            peft_model.base_model.set_adapter(names)  # all active at once: their updates add
            peft_model.eval()
            # Read by gate.groups: generation and teacher-forced scoring switch gated adapters per prompt.
            peft_model.safety_adapters = names
            peft_model.safety_gates = gates
            yield peft_model
        else:
            yield model
    finally:
        if peft_model is not None:
            for attr in ("safety_adapters", "safety_gates"):
                peft_model.__dict__.pop(attr, None)
            restored = peft_model.unload()  # removes LoRA layers, puts the original Linear modules back
            assert restored is model
        if saved:
            params = dict(model.named_parameters())
            with torch.no_grad():
                for k, w in saved.items():
                    params[k].copy_(w)


def attach_for_inference(lm, patches: Sequence[str | Path], force: bool = False) -> None:
    """Attach patches to a LoadedModel for the rest of the process (CLI use)."""
    ps = [read_patch(p) for p in patches]
    ctx = attached(lm.model, ps, lm.fingerprint, force)
    lm.model = ctx.__enter__()
    lm.extra["patches"] = ps
    lm.extra["patch_key"] = stack_key(ps)
    lm.extra["_patch_ctx"] = ctx


def merged_state_dict(model: torch.nn.Module, patches: Sequence[Patch], fingerprint: str | None, force: bool = False) -> dict:
    """The base state dict with every patch folded in; the live model is left untouched.

    LoRA deltas come from PEFT's ``get_delta_weight`` (fp32) and are added to copies, so no
    merge/unmerge round trip perturbs the base weights.
    """
    gated = [str(p.path) for p in patches if p.gated]
    if gated:
        raise SafetyPatchError(
            f"{gated[0]} is a gated patch: its adapter applies only to prompts its gate flags, so it cannot be folded "
            "into the weights (nor trained on top of); attach it instead")
    with attached(model, patches, fingerprint, force) as m:
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


def merge_to_checkpoint(lm, patches: Sequence[str | Path], out: str | Path, force: bool = False) -> Path:
    """Export the base with patches folded in as a standard Hugging Face checkpoint (atomically)."""
    from .atomic import atomic_dir, write_json

    out = Path(out)
    if out.exists():
        raise SafetyPatchError(f"{out} exists; merge writes a new folder (remove it or choose another path)")
    ps = [read_patch(p) for p in patches]
    sd = merged_state_dict(lm.model, ps, lm.fingerprint, force)
    backup = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    try:
        lm.model.load_state_dict(sd, strict=False)
        with atomic_dir(out) as tmp:
            lm.model.save_pretrained(str(tmp), safe_serialization=True)
            lm.tokenizer.save_pretrained(str(tmp))
            write_json(tmp / "merged_from.json", {"base": {"name": lm.name, "fingerprint": lm.fingerprint},
                                                  "patches": [{"path": str(p.path), "id": p.id} for p in ps]})
    finally:
        lm.model.load_state_dict(backup)
    return out


def info(patch: Patch) -> dict:
    m = patch.meta
    t = m.get("training", {})
    return {"path": str(patch.path), "id": patch.id, "format": patch.format, "method": m.get("method"),
            "objective": m.get("objective"), "base": m.get("base", {}).get("name"),
            "base_fingerprint": patch.base_fingerprint, "stack": patch.stack,
            "rank": m.get("config", {}).get("rank"), "target_modules": m.get("config", {}).get("target_modules"),
            "trainable_parameters": t.get("trainable_parameters"), "steps": t.get("steps"),
            "tokens_seen": t.get("tokens_seen"), "wall_seconds": t.get("wall_seconds"),
            "data_manifest_sha256": m.get("data", {}).get("manifest_sha256"), "created": m.get("created"),
            "gate": m.get("gate"), "files": m.get("files")}
