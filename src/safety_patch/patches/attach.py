"""Attaching a stack of patches to a model: the checks against the model, the stack's order,
``attached`` (restores the base bit for bit on exit) and the probe-batch checks that a patch
applies (``probe_effect``) and that a gate routes (``probe_routing``)."""

from __future__ import annotations

import contextlib
import logging
import sys
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..errors import SafetyPatchError
from ..patched import PatchedModel
from .folder import (
    DELTA_FILE,
    LORA_FILES,
    Patch,
    _file_stats,
    _lora_module,
    canonical_adapter_sha256,
    check_unchanged,
    read_patch,
    weight_files,
)

log = logging.getLogger(__name__)


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
    from ..gate.probe import GATE_FILE, Gate

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
    if problems and not force:  # named first: a patch for another model is refused for that, not for a shape
        raise SafetyPatchError(f"{problems[0]}; {remedy}")
    if patch.format == "lora":
        from ..patch_schema import read_adapter_config

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
    for p in problems:
        log.warning("warning: %s (forced)", p)
    return problems


def _files_key(p: Patch) -> tuple:
    """A patch's format and its weight files' sha256 as recorded (not the gate's)."""
    return (p.format, *(p.meta["files"].get(f) for f in weight_files(p.format)))


def _update_key(p: Patch) -> tuple:
    """What a patch changes, by content: :func:`_files_key`, with a LoRA's ``adapter_config.json``
    in canonical form (``folder.canonical_adapter_sha256``: the same adapter written by two
    processes lists ``target_modules`` in two orders)."""
    if p.format == "lora":
        return ("lora", canonical_adapter_sha256(p.path / LORA_FILES[0]), p.meta["files"].get(LORA_FILES[1]))
    return _files_key(p)


def _update_keys(p: Patch) -> tuple[tuple, ...]:
    """:func:`_update_key` and the key merges recorded before 2026-12-05 (:func:`_files_key`),
    which a checkpoint's ``merged_from.json`` may hold."""
    return tuple(dict.fromkeys((_update_key(p), _files_key(p))))


def refuse_merged(model: torch.nn.Module, patches: Sequence[Patch]) -> None:
    """Refuse a patch whose update ``model``'s weights already hold (a checkpoint ``patch merge``
    wrote, whose ``merged_from.json`` lists it by id or by update: ``note_merged``), ``--force`` or
    not: attached again, its update would apply twice. Raises SafetyPatchError naming the patch and
    the record."""
    merged = _MERGED.get(model, {})
    for p in patches:
        if p.id in merged:  # not waived by --force: its update is in these weights already
            raise SafetyPatchError(f"patch {p.id} ({p.path}) is already merged into this model ({merged[p.id]} lists it): "
                                   "attaching it again would apply its update twice")
        for key in _update_keys(p):
            if key in merged:
                raise SafetyPatchError(f"patch {p.id} ({p.path}) holds the same update (identical weights and adapter "
                                       f"settings) as a patch already merged into this model ({merged[key]} lists it; "
                                       "one is the other behind a gate, or a copy written by another run): attaching "
                                       "it would apply that update twice")


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
                                   "weights and adapter settings; one is the other behind a gate, or a copy written by "
                                   "another run): attached together, it would apply twice; give one of them")
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
    from ..patch_schema import load_json_object

    rec = load_json_object(f)
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
    from ..gate.probe import Gate
    from ..patched import PatchedModel, _DeltaState

    if model in _ATTACHED:  # checked first: the wrapped modules would fail verify with a misleading message
        raise SafetyPatchError("a patch stack is already attached to this model: attach all patches in one "
                               "attached() call (they stack in order), or leave the first block before the next")
    ps = [check_unchanged(p) if isinstance(p, Patch) else read_patch(p) for p in patches]
    refuse_merged(model, ps)
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

            from ..models import peft_quiet

            adapter_names = [names[id(p)] for p in loras]
            with peft_quiet():
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
    from ..data.prompts import gate_harmful_prompts, general_prompts
    from ..generation import conversation, render

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
