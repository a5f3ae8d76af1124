"""The gate package keeps its data-flow order: each module imports only the modules its package
docstring lists above it (top-level and in-function imports alike), so there is no import cycle
and a reader can go through the package top to bottom."""

import ast
import re
from pathlib import Path

import safety_patch.gate as gate_pkg

PKG = Path(gate_pkg.__file__).parent


def _listed_order() -> list[str]:
    return list(dict.fromkeys(re.findall(r":mod:`\.(\w+)`", gate_pkg.__doc__)))


def _sibling_imports(module: str) -> set[str]:
    tree = ast.parse((PKG / f"{module}.py").read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            out |= {node.module} if node.module else {a.name for a in node.names}
    return out


def _out_of_order(order: list[str]) -> list[str]:
    return [f"{m} imports {s}" for i, m in enumerate(order) for s in sorted(_sibling_imports(m))
            if s not in order[:i]]


def test_every_gate_module_is_listed_once_and_imports_only_modules_listed_above_it():
    order = _listed_order()
    assert sorted(order) == sorted(p.stem for p in PKG.glob("*.py") if p.stem != "__init__")
    assert _out_of_order(order) == []


def test_the_order_check_can_fail():
    order = _listed_order()
    assert "probe" in _sibling_imports("folder") and _out_of_order(order[::-1])
