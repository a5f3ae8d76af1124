"""Resolve a TrainConfig: defaults <- recipe file <- YAML file <- flags."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import config as cfgmod
from ..errors import FieldError, SafetyPatchError
from .config import RECIPE_DIR, TrainConfig, check_layer, dotted_layer, field_label, merge, recipe_layer


def resolve_config(recipe: str | None = None, path: str | Path | None = None,
                   overrides: Mapping[str, Any] | None = None, where: str = "flags") -> TrainConfig:
    """The config of a run, validated.

    ``recipe``: a name from train/recipes/ (default: the file's ``recipe`` key, else ``default``).
    ``path``: a YAML file in grouped form (``lora: {rank: 16}``). ``overrides``: dotted keys,
    ``{"lora.rank": 16, "method": "full", "gate": None}``, applied as given (None is a value) and
    coerced to the field's type. Raises ``SafetyPatchError`` naming the file or ``where`` and the key.
    """
    file_layer = check_layer(cfgmod.read_yaml(path), str(path)) if path else {}
    flag_layer = check_layer(dotted_layer(overrides or {}, where), where)
    name = recipe or file_layer.pop("recipe", None) or "default"
    file_layer.pop("recipe", None)
    flag_layer.pop("recipe", None)
    layers = [recipe_layer(name), file_layer, flag_layer]
    cfg = merge(layers)
    cfg.recipe = name
    _say_gate_turned_on(cfg, [f"recipe {name}", str(path), where], layers)
    if cfg.method == "full":  # LoRA settings a user gave (a flag or their file) would be silently unused
        given = [k for layer in (file_layer, flag_layer) for k in (layer.get("lora") or {}) if k != "orthogonal_k"]
        if given:
            raise SafetyPatchError(f"{field_label('lora.' + given[0])} sets the LoRA adapter, but the method is full "
                                   "(every weight is trained, no adapter): drop it, or train with --method lora")
    if cfg.loss.objective != "dpo" and any("dpo_beta" in (layer.get("loss") or {}) for layer in (file_layer, flag_layer)):
        raise SafetyPatchError(f"{field_label('loss.dpo_beta')} sets DPO's beta, but the objective is {cfg.loss.objective}: "
                               "drop it, or train with --objective dpo")
    try:
        cfg.validate()
    except FieldError as e:
        # Name the layer that set the value: a flag's message names the flag already; a file's
        # value is named at its line in that file (the recipe's own file included).
        if any(_sets(flag_layer, k) for k in e.keys):
            raise
        for file, layer in ((path, file_layer), (RECIPE_DIR / f"{name}.yaml", layers[0])):
            if file and any(_sets(layer, k) for k in e.keys):
                raise cfgmod.located(e, file, subject=field_label(e.key)) from None
        raise
    return cfg


def _say_gate_turned_on(cfg: TrainConfig, labels: list[str], layers: list[dict[str, Any]]) -> None:
    """Log a warning where a layer says ``gate: null`` and a later one sets a gate field: that turns
    the default gate on (``merge``; documented), which a pool-size flag on an always-on recipe does
    unawares (a user's trial: ``--recipe always-on --gate-self-instruct 7`` wrote a gated patch
    and said "lora patch")."""
    if cfg.gate is None:
        return
    off = [i for i, layer in enumerate(layers) if "gate" in layer and layer["gate"] is None]
    on = [i for i, layer in enumerate(layers) if isinstance(layer.get("gate"), Mapping) and off and i > off[-1]]
    if on:
        import logging

        logging.getLogger("safety_patch").warning(
            "[train] %s has no gate; your gate setting turns the default gate on: this patch will be gated (set in "
            "%s; drop it for an always-on patch)", labels[off[-1]], labels[on[0]])


def _sets(layer: Mapping[str, Any], key: str) -> bool:
    """Whether a checked layer (nested: ``{"lora": {"rank": 16}}``) sets the dotted ``key``."""
    group, _, f = key.partition(".")
    if not f:
        return group in layer
    return isinstance(layer.get(group), Mapping) and f in layer[group]


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """``--set group.field=value`` (repeatable) -> ``{"group.field": value}``; the value is read as
    YAML (``null``, ``true``, ``0.5``, ``10,20``). Raises ``SafetyPatchError`` naming the item."""
    import yaml

    out: dict[str, Any] = {}
    for item in items or []:
        key, eq, raw = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise SafetyPatchError(f"--set {item}: expected group.field=value, e.g. --set optim.grad_accum=2")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        if key in out:  # the last would win silently
            raise SafetyPatchError(f"--set {key} is given twice ({key}={out[key]} and {item.strip()}); give it once")
        out[key] = value
    return out
