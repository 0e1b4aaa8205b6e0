"""Plain data <-> the config dataclasses, rejecting unknown keys, wrong types and out-of-range values, with every
problem collected as one line (`source: key.path: problem; allowed: ...`); dotted-path helpers."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import field
from typing import Any, Literal

from ackd_search.errors import ConfigError


def bounds(ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None):
    """Field metadata with a validated range (checked by `from_dict`)."""
    return {"bounds": {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}}


def bounded(ge=None, gt=None, le=None, lt=None, default=None, **kw):
    """A dataclass field with a default and a validated range."""
    return field(default=default, metadata=bounds(ge, gt, le, lt), **kw)


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: Any, source: str = "<config>") -> Any:
    """Build `cls` from plain data, rejecting unknown keys, wrong types and out-of-range values."""
    problems: list[str] = []
    obj = convert(cls, data, "", source, problems)
    if problems:
        raise ConfigError(problems)
    return obj



def field_info(cls: type, dotted: str) -> tuple[Any, dict]:
    """The type and metadata of a dotted config path such as `distill.ackd.adv_weight`."""
    hints, meta = typing.get_type_hints(cls), {f.name: f.metadata for f in dataclasses.fields(cls)}
    head, _, rest = dotted.partition(".")
    if head not in hints:
        raise KeyError(dotted)
    tp = strip_optional(hints[head])
    if rest:
        if not dataclasses.is_dataclass(tp):
            raise KeyError(dotted)
        return field_info(tp, rest)
    return hints[head], dict(meta[head])


def check_value(cls: type, dotted: str, value: Any, source: str) -> list[str]:
    """Problems with `value` as the value of `dotted` in `cls` (empty when it is legal)."""
    problems: list[str] = []
    tp, meta = field_info(cls, dotted)
    convert(tp, value, dotted, source, problems, meta)
    return problems


def strip_optional(tp: Any) -> Any:
    args = typing.get_args(tp)
    if _is_union(tp) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else tp
    return tp


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


def _allowed_text(tp: Any, meta: dict) -> str:
    if "choices_fn" in meta:
        return ", ".join(meta["choices_fn"]())
    if typing.get_origin(tp) is Literal:
        return ", ".join(str(a) for a in typing.get_args(tp))
    return ""


def convert(tp: Any, value: Any, path: str, source: str, problems: list[str], meta: dict | None = None) -> Any:
    meta = meta or {}
    where = f"{source}: {path or '<top>'}"
    if _is_union(tp):
        if value is None and type(None) in typing.get_args(tp):
            return None
        tp = strip_optional(tp)
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(tp, value, path, source, problems)
    if typing.get_origin(tp) is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed or isinstance(value, bool) != isinstance(allowed[0], bool):
            problems.append(f"{where}: {value!r} is not allowed; allowed: {_allowed_text(tp, meta)}")
        return value
    if typing.get_origin(tp) is list:
        if not isinstance(value, list):
            problems.append(f"{where}: expected a list, got {type(value).__name__} {value!r}")
            return value
        (item_tp,) = typing.get_args(tp)
        return [convert(item_tp, v, f"{path}[{i}]", source, problems) for i, v in enumerate(value)]
    value = _convert_scalar(tp, value, where, problems)
    if value is None:
        return None
    if "choices_fn" in meta and value not in meta["choices_fn"]():
        problems.append(f"{where}: unknown value {value!r}; allowed: {_allowed_text(tp, meta)}")
    elif "check_fn" in meta and (problem := meta["check_fn"](value)) is not None:
        problems.append(f"{where}: {problem}")  # the checker names what is allowed
    _check_bounds(value, meta.get("bounds", {}), where, problems)
    return value


# Each scalar type: what the error calls it, which plain values it accepts, and how it takes them.
_SCALARS: dict[type, tuple[str, Any, Any]] = {
    bool: ("true or false", lambda v: isinstance(v, bool), bool),
    int: ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool), int),
    float: ("a number", lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), float),
    dict: ("a mapping", lambda v: isinstance(v, dict), dict),
    str: ("a string", lambda v: isinstance(v, str), str),
}


def _convert_scalar(tp: Any, value: Any, where: str, problems: list[str]) -> Any:
    if tp not in _SCALARS:
        raise TypeError(f"unsupported config type {tp!r} at {where}")
    expected, accepts, make = _SCALARS[tp]
    if not accepts(value):
        problems.append(f"{where}: expected {expected}, got {value!r}")
        return None
    return make(value)


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_BOUND_OK = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b, "lt": lambda v, b: v < b}


def _check_bounds(value: Any, bounds: dict, where: str, problems: list[str]) -> None:
    failed = [k for k, b in bounds.items() if not _BOUND_OK[k](value, b)]
    if failed:
        allowed = " and ".join(f"{_BOUND_TEXT[k]} {b}" for k, b in bounds.items())
        problems.append(f"{where}: {value!r} is out of range; allowed: {allowed}")


def _convert_dataclass(cls: type, value: Any, path: str, source: str, problems: list[str]) -> Any:
    where = f"{source}: {path or '<top>'}"
    if value is None:
        value = {}
    if not isinstance(value, dict):
        problems.append(f"{where}: expected a mapping, got {type(value).__name__} {value!r}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in value:
        if key not in fields:
            problems.append(f"{source}: {_join(path, str(key))}: unknown key; allowed: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        if name in value:
            kwargs[name] = convert(hints[name], value[name], _join(path, name), source, problems, dict(f.metadata))
    try:
        return cls(**kwargs)
    except (TypeError, ValueError):
        return cls()


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def set_path(data: dict, dotted: str, value: Any) -> None:
    """Set `data['a']['b'] = value` for `dotted == 'a.b'`, creating mappings on the way."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        data = data.setdefault(key, {})
    data[leaf] = value


def get_path(data: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        data = data[key]
    return data
