"""Typed method configurations: a frozen dataclass per method is its config schema.

``parse_config(Schema, cfg)`` refuses unknown keys (naming the closest known one), missing keys and values
of the wrong type before any work starts, so a typo in a suite file or a ``--set`` override is a one-line
error instead of a silently ignored key or a crash after training began. Field types are the annotations:
``int``, ``float`` (an int is accepted), ``bool``, ``str``, ``Literal[...]`` (one of the listed values),
``tuple[float, ...]`` / ``tuple[int, ...]`` (a TOML array), and ``X | None``. bool is never an int here:
``width = true`` is refused.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal, Mapping, TypeVar

from methods.base import MethodError

T = TypeVar("T")


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(v) for v in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_describe(typing.get_args(tp)[0])}s"
    if tp is type(None):
        return "absent"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(tp: Any, value: Any) -> tuple[bool, Any]:
    """(ok, value converted to the field's type)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return value in typing.get_args(tp) and not isinstance(value, bool), value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, out = _coerce(arg, value)
            if ok:
                return True, out
        return False, value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return False, value
        item = typing.get_args(tp)[0]
        converted = [_coerce(item, v) for v in value]
        return all(ok for ok, _ in converted), tuple(v for _, v in converted)
    if tp is type(None):
        return value is None, value
    if tp is bool:
        return isinstance(value, bool), value
    if isinstance(value, bool):
        return False, value
    if tp is float:
        return isinstance(value, (int, float)), float(value) if isinstance(value, (int, float)) else value
    return isinstance(value, tp), value


def parse_config(schema: type[T], cfg: Mapping[str, Any], owner: str) -> T:
    """``cfg`` as an instance of the dataclass ``schema``; ``MethodError`` naming the first bad key."""
    fields = {f.name: f for f in dataclasses.fields(schema)}  # type: ignore[arg-type]
    hints = typing.get_type_hints(schema)
    unknown = sorted(set(cfg) - set(fields))
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(fields), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise MethodError(f"{owner}: unknown config key {unknown[0]!r}{hint}; "
                          f"known: {', '.join(sorted(fields))}")
    missing = sorted(k for k, f in fields.items() if k not in cfg and f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)
    if missing:
        raise MethodError(f"{owner}: config lacks {', '.join(missing)}")
    values: dict[str, Any] = {}
    for key, value in cfg.items():
        ok, converted = _coerce(hints[key], value)
        if not ok:
            raise MethodError(f"{owner}: config key {key} must be {_describe(hints[key])}, got {value!r}")
        values[key] = converted
    return schema(**values)


def require(condition: bool, owner: str, message: str) -> None:
    """A value check beyond its type (a range, an order between keys)."""
    if not condition:
        raise MethodError(f"{owner}: {message}")
