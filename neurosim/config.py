"""Validated configuration dataclasses, shared by device cards, crossbars, circuits, trainers and scenarios.

Every user-facing setting lives in a dataclass field with a one-line ``doc`` and optional bounds in its
metadata. ``build`` turns a plain dict (parsed TOML) into such a dataclass and refuses unknown fields,
missing fields, wrong types and out-of-range values with a ``ConfigError`` that names the file, the field
and the value -- the one line the CLI prints before exiting with status 2.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A user's setting is wrong: names where (file), what (dotted field) and the offending value."""

    def __init__(self, field: str, value: Any, reason: str, source: str | None = None):
        self.field = field
        self.value = value
        self.reason = reason
        self.source = source
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"{self.source}: " if self.source else ""
        what = f"field '{self.field}'" if self.field else "file"
        value = "" if self.value is _MISSING else f" = {self.value!r}"
        return f"{where}{what}{value}: {self.reason}"

    def within(self, prefix: str = "", source: str | None = None) -> ConfigError:
        """The same error, seen from an enclosing table and/or file."""
        field = f"{prefix}.{self.field}" if prefix and self.field else (self.field or prefix)
        return ConfigError(field, self.value, self.reason, self.source or source)


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()


def setting(default: Any = dataclasses.MISSING, doc: str = "", *, ge: float | None = None,
            gt: float | None = None, le: float | None = None, lt: float | None = None,
            choices: tuple | None = None, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a doc line and bounds that ``check`` enforces."""
    meta = {"doc": doc, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            return False
        inner = args[0] if args else Any
        return all(_type_ok(v, inner) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, Mapping)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (tuple, list):
        args = typing.get_args(tp)
        return f"a list of {_type_name(args[0]) if args else 'values'}"
    return {float: "a number", int: "an integer", bool: "true or false", str: "a string",
            type(None): "none"}.get(tp, getattr(tp, "__name__", str(tp)))


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass type inside ``tp`` (``X`` or ``X | None``), if any."""
    if dataclasses.is_dataclass(tp):
        return tp
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            if dataclasses.is_dataclass(a):
                return a
    return None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    """The resolved field types of a config class (resolving them is slow, and configs are checked often:
    ``dataclasses.replace`` of an activation config runs at every DGC step)."""
    return typing.get_type_hints(cls)


def check(obj: Any) -> None:
    """Type and bound checks of every field of a dataclass instance (nested ones are checked by build)."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        tp = hints[f.name]
        if _dataclass_in(tp) and (dataclasses.is_dataclass(value) or value is None):
            continue
        if not _type_ok(value, tp):
            raise ConfigError(f.name, value, f"must be {_type_name(tp)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f.name, value, "must be a finite number")
        m = f.metadata
        if m.get("choices") is not None and value not in m["choices"]:
            raise ConfigError(f.name, value, "must be one of " + ", ".join(map(repr, m["choices"])))
        if isinstance(value, int | float) and not isinstance(value, bool):
            for key, ok, word in (("ge", value.__ge__, ">="), ("gt", value.__gt__, ">"),
                                  ("le", value.__le__, "<="), ("lt", value.__lt__, "<")):
                bound = m.get(key)
                if bound is not None and not ok(bound):
                    raise ConfigError(f.name, value, f"must be {word} {bound}")


def build(cls: type[T], data: Mapping[str, Any] | None, *, source: str | None = None,
          prefix: str = "") -> T:
    """Make ``cls`` from a dict, refusing unknown, missing, mistyped and out-of-range fields."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    try:
        if unknown:
            known = ", ".join(sorted(fields))
            raise ConfigError(unknown[0], data[unknown[0]], f"unknown field (known: {known})")
        kwargs = {}
        for name, f in fields.items():
            if name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    raise ConfigError(name, _MISSING, "missing required field")
                continue
            value = data[name]
            sub = _dataclass_in(hints[name])
            if sub is not None and isinstance(value, Mapping):
                value = build(sub, value, prefix=name)
            elif sub is not None and not (value is None or dataclasses.is_dataclass(value)):
                raise ConfigError(name, value, "must be a table")
            kwargs[name] = value
        obj = cls(**kwargs)
        check(obj)
        validate = getattr(obj, "validate", None)
        if validate is not None:
            validate()
        return obj
    except ConfigError as e:
        raise e.within(prefix, source) from None
    except (TypeError, ValueError) as e:  # a field's own constructor refused the value
        raise ConfigError(prefix, _MISSING, str(e), source) from None


def load_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file; a missing file or a syntax error becomes a ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("", _MISSING, "no such file", str(path)) from None
    except (IsADirectoryError, PermissionError, UnicodeDecodeError) as e:
        raise ConfigError("", _MISSING, f"cannot read: {e}", str(path)) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", _MISSING, f"not valid TOML: {e}", str(path)) from None


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a plain dict (nested tables included), ready for TOML or HDF5 attributes."""
    return dataclasses.asdict(obj)


def with_overrides(obj: T, overrides: Mapping[str, Any], *, source: str | None = None) -> T:
    """A copy of a config with dotted updates applied (``{"device.c2c": 0.02}``), validated again."""
    data = to_dict(obj)
    for key, value in overrides.items():
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(key, value, f"'{part}' is not a table of this configuration", source)
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(key, value, "unknown field", source)
        node[parts[-1]] = value
    return build(type(obj), data, source=source)
