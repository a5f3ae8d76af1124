"""Resolve a TrainConfig: recipe preset <- YAML file <- flags."""

from __future__ import annotations

from pathlib import Path

from .. import config as cfgmod
from ..errors import SafetyPatchError
from .config import RECIPES, TrainConfig


def resolve_config(recipe: str | None = None, path: str | Path | None = None, overrides: dict | None = None) -> TrainConfig:
    # The file is validated in full (unknown keys, types) but only its explicit keys override the recipe.
    if path:
        cfgmod.load(TrainConfig, path)
    file_values = _explicit_yaml(path) if path else {}
    name = recipe or file_values.get("recipe") or "default"
    if name not in RECIPES:
        raise SafetyPatchError(f"unknown recipe {name!r}; valid: {', '.join(sorted(RECIPES))}")
    merged = {"recipe": name} | RECIPES[name] | file_values | {k: v for k, v in (overrides or {}).items() if v is not None}
    return cfgmod.build(TrainConfig, merged, str(path) if path else "train config")


def _explicit_yaml(path) -> dict:
    import yaml

    return yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
