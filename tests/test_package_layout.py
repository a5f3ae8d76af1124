"""The packages split by concern keep their data-flow order: each module imports only the modules
its package docstring lists above it (top-level and in-function imports alike), so there is no
import cycle and a reader can go through the package top to bottom."""

import ast
import importlib
import re
from pathlib import Path

import pytest

PACKAGES = {"safety_patch.gate": ("folder", "probe"), "safety_patch.patches": ("merge", "attach"),
            "safety_patch.report": ("render", "read")}
"""Each package, with one module and a sibling it imports (the check below is shown to fail on them)."""


def _dir(package: str) -> Path:
    return Path(importlib.import_module(package).__file__).parent


def _listed_order(package: str) -> list[str]:
    return list(dict.fromkeys(re.findall(r":mod:`\.(\w+)`", importlib.import_module(package).__doc__)))


def _sibling_imports(package: str, module: str) -> set[str]:
    tree = ast.parse((_dir(package) / f"{module}.py").read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module} if node.module else {a.name for a in node.names}
    return out


def _out_of_order(package: str, order: list[str]) -> list[str]:
    return [f"{m} imports {s}" for i, m in enumerate(order) for s in sorted(_sibling_imports(package, m))
            if s not in order[:i]]


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_every_module_is_listed_once_and_imports_only_modules_listed_above_it(package):
    order = _listed_order(package)
    assert sorted(order) == sorted(p.stem for p in _dir(package).glob("*.py") if p.stem != "__init__")
    assert _out_of_order(package, order) == []


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_the_order_check_can_fail(package):
    order = _listed_order(package)
    module, sibling = PACKAGES[package]
    assert sibling in _sibling_imports(package, module) and _out_of_order(package, order[::-1])
