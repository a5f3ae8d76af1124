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

The package, by concern, each module importing only those listed above it:

* :mod:`.folder`: the files, ``patch.json`` and the one reader that checks them (``read_patch``);
* :mod:`.attach`: ``verify`` against a model, ``attached``, the probe-batch checks;
* :mod:`.merge`: folding patches into a checkpoint (``merge_to_checkpoint``).

Every name below is importable from ``safety_patch.patches`` as before the split (2026-12-05).
"""

from __future__ import annotations

from .attach import (
    PROBE_TEXT,
    attach_for_inference,
    attached,
    item_names,
    note_merged,
    probe_effect,
    probe_routing,
    stack_key,
    verify,
)
from .folder import (
    DELTA_FILE,
    LORA_FILES,
    PATCH_JSON,
    PICKLE_SUFFIXES,
    Patch,
    check_unchanged,
    check_weight_tensors,
    finalize_patch,
    folder_name,
    info,
    read_patch,
    weight_files,
)
from .merge import merge_to_checkpoint, merged_from, merged_state_dict, tied_targets

__all__ = [
    "DELTA_FILE", "LORA_FILES", "PATCH_JSON", "PICKLE_SUFFIXES", "PROBE_TEXT", "Patch", "attach_for_inference",
    "attached", "check_unchanged", "check_weight_tensors", "finalize_patch", "folder_name", "info", "item_names",
    "merge_to_checkpoint", "merged_from", "merged_state_dict", "note_merged", "probe_effect", "probe_routing", "read_patch",
    "stack_key", "tied_targets", "verify", "weight_files",
]
