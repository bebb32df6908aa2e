"""Typed configs that round-trip to JSON.

Every config in fewstep is a ``@dataclass``; :func:`to_dict` / :func:`from_dict`
convert to and from plain JSON values, rejecting unknown keys with a message
that lists the known ones, and :func:`validate` runs each class's checks.
"""
from __future__ import annotations

import dataclasses
import json
import typing
from pathlib import Path
from typing import Any, TypeVar

from .errors import FewstepError

T = TypeVar("T")


def to_dict(cfg: Any) -> dict:
    """Convert a (nested) dataclass to JSON-ready values."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {str(k): to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, Path):
        return str(cfg)
    return cfg


def _convert(tp, value, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp) and isinstance(value, dict):
        return from_dict(tp, value, where=where)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(a, value, where)
            except (TypeError, ValueError, FewstepError):
                continue
        raise FewstepError(f"config value {where}={value!r} does not match type {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise FewstepError(f"config value {where} must be a list, got {value!r}")
        fixed = origin is tuple and bool(args) and args[-1] is not Ellipsis
        if fixed and len(value) != len(args):
            raise FewstepError(f"config value {where} must be a list of {len(args)} values, got {list(value)!r}")
        inner = args[0] if args else Any
        out = [_convert(args[i] if fixed else inner, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if tp is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise FewstepError(f"config value {where} must be a number, got {value!r}")
        return float(value)
    if tp is int and isinstance(value, bool):
        raise FewstepError(f"config value {where} must be an integer, got {value!r}")
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise FewstepError(f"config value {where} must be {tp.__name__}, got {value!r}")
    if (tp is dict or origin is dict) and not isinstance(value, dict):
        raise FewstepError(f"config value {where} must be a JSON object {{...}}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, *, where: str | None = None) -> T:
    """Build dataclass ``cls`` from JSON values; unknown keys are an error."""
    where = where or cls.__name__
    if not isinstance(data, dict):
        raise FewstepError(f"{where} must be a JSON object, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise FewstepError(f"unknown key(s) {unknown} in {where}; known keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    validate(obj)
    return obj


def validate(cfg: Any) -> None:
    """Run ``cfg.validate()`` (and that of nested configs) if defined."""
    if dataclasses.is_dataclass(cfg):
        for f in dataclasses.fields(cfg):
            v = getattr(cfg, f.name)
            if dataclasses.is_dataclass(v):
                validate(v)
        if hasattr(cfg, "validate"):
            cfg.validate()


def replace(cfg: T, **changes) -> T:
    """``dataclasses.replace`` that re-validates and reports unknown fields clearly."""
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(changes) - names)
    if unknown:
        raise FewstepError(f"unknown option(s) {unknown} for {type(cfg).__name__}; known: {sorted(names)}")
    out = dataclasses.replace(cfg, **changes)
    validate(out)
    return out


def save_json(obj: Any, path: str | Path) -> None:
    """Write JSON atomically (temp file + rename)."""
    from .training.checkpoint import atomic_write_text

    atomic_write_text(Path(path), json.dumps(to_dict(obj), indent=2, sort_keys=False) + "\n")


def load_json(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FewstepError(f"config file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FewstepError(f"{path} is not valid JSON ({e}); was the file truncated?") from None


def require(cond: bool, message: str) -> None:
    """Config-range check used inside ``validate`` methods."""
    if not cond:
        raise FewstepError(message)
