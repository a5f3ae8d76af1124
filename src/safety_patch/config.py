"""Typed dataclass configs: YAML files are data, flags override, unknown keys are errors."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any, TypeVar

from .errors import FieldError, SafetyPatchError, field_path

T = TypeVar("T")


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if value is None:
        if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)) and type(None) in args:
            return None
        raise SafetyPatchError(f"{where}: expected {getattr(typ, '__name__', typ)}, got null")
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except SafetyPatchError:
                continue
        raise SafetyPatchError(f"{where}: cannot use {value!r} as {typ}")
    if origin in (tuple, list):
        if isinstance(value, str):  # "a, b" is ["a", "b"]; "" none; "a,,b" or "a," a slip, not two or one values
            items = [v.strip() for v in value.split(",")] if value.strip() else []
            if "" in items:
                raise SafetyPatchError(f"{where}: {value!r} has an empty item (two commas, or one at an end); give "
                                       "comma-separated values")
            value = items
        if not isinstance(value, (list, tuple)):
            raise SafetyPatchError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else str
        seq = [_coerce(v, inner, where) for v in value]
        if inner is str and any(not v.strip() for v in seq):  # [a, "", b]: a slip, later an unknown name ''
            raise SafetyPatchError(f"{where}: item {[v.strip() for v in seq].index('') + 1} of {list(value)!r} is empty")
        return tuple(seq) if origin is tuple else seq
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):  # `--set k=1`: YAML reads the number, the string forms say 1 is true
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise SafetyPatchError(f"{where}: expected true/false, got {value!r}")
    if typ in (int, float, str):
        if isinstance(value, bool):  # int(True) is 1: `rank: true` would train a rank-1 adapter
            raise SafetyPatchError(f"{where}: expected {typ.__name__}, got {value!r}")
        if isinstance(value, (list, tuple, dict)):  # str() would make "['q_proj', 'v_proj']" a module name
            raise SafetyPatchError(f"{where}: expected {typ.__name__}, got a {'mapping' if isinstance(value, dict) else 'list'} "
                                   f"{value!r}")
        # A quoted number is read as that number: YAML 1.1 reads `lr: 1e-4` (no dot) as a string.
        try:
            if typ is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return typ(value)
        except (TypeError, ValueError):
            raise SafetyPatchError(f"{where}: expected {typ.__name__}, got {value!r}") from None
    return value


def build(cls: type[T], values: dict, where: str = "config") -> T:
    """Make ``cls`` from a dict, naming the unknown or mistyped field."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise SafetyPatchError(f"{where}: unknown key(s) {', '.join(field_path((u,)) for u in unknown)}; valid: {', '.join(sorted(names))}")
    kwargs = {}
    for k, v in values.items():
        try:
            kwargs[k] = _coerce(v, hints[k], f"field '{k}'")
        except SafetyPatchError as e:  # as a FieldError, so `load` can name the file's line
            raise FieldError(str(e), k) from None
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate:
        validate()
    return obj


def load(cls: type[T], path: str | Path | None = None, overrides: dict | None = None) -> T:
    """Defaults <- YAML file <- explicit overrides (None values mean "not given"). A value out of
    range that the file set is reported at its line in the file (``located``)."""
    values: dict = {}
    file_values: dict = {}
    if path:
        file_values = read_yaml(path)
        values.update(file_values)
        where = str(path)
    else:
        where = "config"
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    values.update(given)
    try:
        return build(cls, values, where)
    except FieldError as e:
        if path and any(k in file_values and k not in given for k in e.keys):
            raise located(e, path) from None
        raise


def located(e: FieldError, path: str | Path, subject: str | None = None) -> SafetyPatchError:
    """``e`` (a value the YAML file ``path`` set) as one line naming the file and the line of the
    first of ``e.keys`` found there: ``train.yaml:3: lora.rank must be >= 1, got 0``. ``subject``:
    how ``e`` names its field (a CLI flag, ``--rank``), replaced by the dotted key."""
    msg = str(e)
    for key in e.keys:
        line = key_line(path, key)
        if line is not None:
            if subject and msg.startswith(subject + " "):
                msg = key + msg[len(subject):]
            return SafetyPatchError(f"{path}:{line}: {msg}")
    return SafetyPatchError(f"{path}: {msg}")


def key_line(path: str | Path, key: str) -> int | None:
    """The 1-based line of a dotted key (``lora.rank``) in a YAML mapping file; the last one where a
    key repeats (as ``yaml.safe_load`` reads it); None where the file does not set it."""
    import yaml

    from .jsonl import read_text

    try:
        node = yaml.compose(read_text(Path(path), "config "))
    except (yaml.YAMLError, SafetyPatchError):
        return None
    line = None
    for part in key.split("."):
        if not isinstance(node, yaml.MappingNode):
            return None
        hit = [(k, v) for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == part]
        if not hit:
            return None
        k, node = hit[-1]
        line = k.start_mark.line + 1
    return line


def read_yaml(path: str | Path) -> dict:
    """A YAML config file as a dict (empty file: ``{}``). Raises ``SafetyPatchError`` naming the file
    (and line) when it cannot be read, is not YAML, or is not a mapping."""
    import yaml

    from .jsonl import read_text

    p = Path(path)
    if p.suffix.lower() == ".toml":  # a user's trial: "expected a mapping" / "invalid YAML" said nothing of why
        raise SafetyPatchError(f"{p}: config files are YAML (JSON is YAML too); TOML is not read")
    try:
        text = read_text(p, "config ")
        _no_repeated_keys(yaml.compose(text), p)
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise SafetyPatchError(f"{p}{line}: invalid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise SafetyPatchError(f"{p}: expected a mapping of config keys")
    return data


def _no_repeated_keys(node, path: Path) -> None:
    """Refuse a key given twice in one mapping: ``yaml.safe_load`` silently keeps the last, so the
    first value a user wrote (and reads) would not be the one used. Raises SafetyPatchError naming
    both lines."""
    import yaml

    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode):
                line = k.start_mark.line + 1
                if k.value in seen:
                    raise SafetyPatchError(f"{path}:{line}: key '{k.value}' is given twice (also on line "
                                           f"{seen[k.value]}); give it once")
                seen[k.value] = line
            _no_repeated_keys(v, path)
    elif isinstance(node, yaml.SequenceNode):
        for v in node.value:
            _no_repeated_keys(v, path)


def as_dict(obj) -> dict:
    return dataclasses.asdict(obj)
