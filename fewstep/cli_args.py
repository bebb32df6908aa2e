"""argparse options generated from config dataclasses (help text from field metadata)."""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing

from .config import from_dict, to_dict
from .errors import FewstepError


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _base_type(tp):
    origin = typing.get_origin(tp)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    return tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, title: str,
                       skip: tuple[str, ...] = (), defaults: dict | None = None) -> None:
    """Add one ``--field-name`` option per dataclass field (default: unset). ``defaults`` overrides the
    dataclass's own defaults in the help text (e.g. a method's ``train_defaults``, which it runs with).
    Fields that may be ``None`` accept ``null`` (or ``none``) on the command line."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(cls)
    defaults = {**to_dict(cls()), **(defaults or {})}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        tp = _base_type(hints[f.name])
        origin = typing.get_origin(tp)
        helptext = f.metadata.get("help", "")
        default = defaults[f.name]
        shown = "unset" if default is None else json.dumps(default) if not isinstance(default, str) else default
        helptext = f"{helptext} (default: {shown})".replace("%", "%%")
        if tp is bool:
            group.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                               default=None, help=helptext)
        elif origin in (list, tuple) or tp is dict:
            group.add_argument(_flag(f.name), dest=f.name, type=_json_value(f.name), default=None,
                               metavar="JSON", help=helptext)
        else:
            conv = {int: int, float: float}.get(tp, str)
            if _optional(hints[f.name]) and conv is not str:
                conv = _or_null(conv, f.name)
            choices = f.metadata.get("choices")
            group.add_argument(_flag(f.name), dest=f.name, type=conv, default=None, choices=choices,
                               metavar=None if choices else tp.__name__.upper() if hasattr(tp, "__name__") else "VALUE",
                               help=helptext)


def _optional(tp) -> bool:
    return type(None) in typing.get_args(tp)


class Null:
    """``--option null`` for an optional field: the field is set to None (argparse's None means unset)."""

    def __repr__(self) -> str:
        return "null"


NULL = Null()


def _or_null(conv, name: str):
    def parse(text: str):
        if text.strip().lower() in ("null", "none"):
            return NULL
        try:
            return conv(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')} expects a number or null, got {text!r}") from None
    parse.__name__ = conv.__name__  # argparse names the type in its messages
    return parse


def _json_value(name: str):
    def parse(text: str):
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            if "," in text:
                return [json.loads(t) if t.strip().replace(".", "", 1).lstrip("-").isdigit() else t.strip()
                        for t in text.split(",")]
            raise argparse.ArgumentTypeError(f"--{name.replace('_', '-')} expects JSON, got {text!r}")
    return parse


def dataclass_from_args(cls: type, args: argparse.Namespace, base: dict | None = None):
    """Build ``cls`` from defaults, then ``base`` (e.g. a preset), then options the user set."""
    values = to_dict(cls())
    if base:
        values.update(base)
    for f in dataclasses.fields(cls):
        v = getattr(args, f.name, None)
        if v is not None:
            values[f.name] = None if v is NULL else v
    try:
        return from_dict(cls, values)
    except TypeError as e:  # pragma: no cover - from_dict reports most problems itself
        raise FewstepError(str(e)) from None
