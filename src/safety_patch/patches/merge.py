"""Folding patches into the weights: ``merged_state_dict`` and ``merge_to_checkpoint`` (a standard
checkpoint with ``merged_from.json``), refusing what would not be the attached model (gated
patches, LoRA on tied weights, a patch already merged in)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..errors import SafetyPatchError
from .attach import _logits, _probe_ids, _update_key, attached
from .folder import LORA_FILES, Patch, _lora_module, read_patch


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
    from ..atomic import atomic_dir, write_json
    from ..outputs import looks_like

    out = Path(out)
    if out.exists() and not (overwrite and out.is_dir() and looks_like(out, "merged")):
        raise SafetyPatchError(f"{out} exists; merge writes a new folder (remove it, choose another path, or pass "
                               "--overwrite to replace a merged checkpoint safety-patch wrote)")
    ps = [read_patch(p) for p in patches]
    prior = merged_from(lm)
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
        from ..fingerprint import fingerprint

        merged = {"fingerprint": fingerprint(lm.model, lm.tokenizer),  # what patches trained on it bind to
                  "dtype": str(next(lm.model.parameters()).dtype).removeprefix("torch.")}
        with atomic_dir(out, overwrite=overwrite, kind="merged") as tmp:
            lm.model.save_pretrained(str(tmp), safe_serialization=True)
            lm.tokenizer.save_pretrained(str(tmp))
            write_json(tmp / "merged_from.json", _merge_record(lm, ps, prior, merged))
    finally:
        lm.model.load_state_dict(backup)
    return out


def merged_from(lm) -> dict:
    """The ``merged_from.json`` of the checkpoint ``lm`` (a ``models.LoadedModel``) was loaded from
    ({} for any other model): ``patches`` (each merged patch's path, id and update), ``base``,
    ``fingerprint``, ``dtype`` and provenance (:func:`_merge_record`).
    Raises SafetyPatchError naming the file when it is not a JSON object."""
    from ..patch_schema import load_json_object

    f = Path(lm.path) / "merged_from.json" if lm.path else None
    if f is None or not f.is_file():
        return {}
    rec = load_json_object(f)
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

    from ..provenance import code_identity, library_versions

    this = {"name": lm.name, "fingerprint": lm.fingerprint}
    return {"base": prior.get("base") or this,
            **({"merged_into": this} if prior else {}),
            "fingerprint": merged["fingerprint"], "dtype": merged["dtype"],
            "patches": [*prior.get("patches", []),
                        *({"path": str(p.path), "id": p.id, "update": list(_update_key(p))} for p in ps)],
            "code": code_identity(), "versions": library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
