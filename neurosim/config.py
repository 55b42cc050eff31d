"""Validated configuration dataclasses, shared by device cards, crossbars, circuits, trainers and scenarios.

Every user-facing setting lives in a dataclass field with a one-line ``doc`` and optional bounds in its
metadata. ``build`` turns a plain dict (parsed TOML) into such a dataclass and refuses unknown fields,
missing fields, wrong types and out-of-range values with a ``ConfigError`` that names the file, the field
and the value -- the one line the CLI prints before exiting with status 2. ``build`` also normalizes what
TOML gives (lists become tuples, integers in float fields become floats), so that equal settings compare and
hash equal however they were written.

Dotted paths (``get_path``, ``set_path``, ``with_overrides``) address a field anywhere in a tree of settings;
``parse_literal`` reads a command line's value as a TOML literal, and ``dump_toml`` writes settings back as
TOML text that ``tomllib`` reads to the same values.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
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
        value = "" if self.value is _MISSING else f" = {_short_repr(self.value)}"
        # One line whatever the parts hold: the CLI prints exactly one.
        return _one_line(f"{where}{what}{value}: {self.reason}")

    def within(self, prefix: str = "", source: str | None = None) -> ConfigError:
        """The same error, seen from an enclosing table and/or file."""
        field = f"{prefix}.{self.field}" if prefix and self.field else (self.field or prefix)
        return ConfigError(field, self.value, self.reason, self.source or source)


class _Missing:
    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Any = _Missing()

# Longest value a message quotes in full (a whole table given where a number belongs would fill the screen).
_MAX_REPR = 160


def _as_written(value: Any) -> Any:
    """Tuples shown as the lists a TOML file writes."""
    if isinstance(value, tuple | list):
        return [_as_written(v) for v in value]
    return value


def _short_repr(value: Any) -> str:
    try:
        text = repr(_as_written(value))
    except RecursionError:
        return "<nested too deeply to show>"
    return text if len(text) <= _MAX_REPR else text[:_MAX_REPR - 3] + "..."


def _one_line(text: str) -> str:
    return re.sub(r"\s*[\r\n]+\s*", " ", text)


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
        inner = _type_name(args[0]) if args else "values"
        plural = {"a number": "numbers", "an integer": "integers", "a string": "strings",
                  "true or false": "booleans"}
        return f"a list of {plural.get(inner, inner)}"
    if tp is dict or origin is dict:
        return "a table"
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
        if isinstance(value, list | tuple) and not all(math.isfinite(v) for v in _floats_in(value)):
            raise ConfigError(f.name, value, "must hold finite numbers")
        m = f.metadata
        if m.get("choices") is not None and value not in m["choices"]:
            raise ConfigError(f.name, value, "must be one of " + ", ".join(map(repr, m["choices"])))
        if isinstance(value, int | float) and not isinstance(value, bool):
            for key, ok, word in (("ge", value.__ge__, ">="), ("gt", value.__gt__, ">"),
                                  ("le", value.__le__, "<="), ("lt", value.__lt__, "<")):
                bound = m.get(key)
                if bound is not None and not ok(bound):
                    raise ConfigError(f.name, value, f"must be {word} {bound}")


def _floats_in(value: Any):
    """Every float inside nested lists and tuples."""
    for v in value:
        if isinstance(v, float):
            yield v
        elif isinstance(v, list | tuple):
            yield from _floats_in(v)


def normalize(value: Any, tp: Any) -> Any:
    """``value`` in the canonical form of a field of type ``tp``: a list becomes a tuple where the field holds
    a tuple, an integer becomes a float where it holds a float (TOML writes ``1`` and ``[1, 2]``; the
    dataclasses hold ``1.0`` and ``(1, 2)``), so that equal settings compare and hash equal and are written
    back the same. A value of the wrong type is returned as it is, for ``check`` to refuse."""
    if value is None or isinstance(value, bool):
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for a in typing.get_args(tp):
            if a is type(None):
                continue
            v = normalize(value, a)
            if _type_ok(v, a):
                return v
        return value
    if tp is float and isinstance(value, int):
        try:
            return float(value)
        except OverflowError:  # beyond the float range: check() refuses the infinity by name
            return math.inf if value > 0 else -math.inf
    if origin in (tuple, list) and isinstance(value, list | tuple):
        args = typing.get_args(tp)
        if (len(args) == 2 and args[1] is Ellipsis) or len(args) != len(value):
            args = (args[0] if args else Any,) * len(value)
        out = tuple(normalize(v, a) for v, a in zip(value, args, strict=True))
        return out if _type_ok(out, tp) else value   # a wrong entry: refused as written
    return value


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
            elif sub is None:
                value = normalize(value, hints[name])
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
    except (OSError, UnicodeDecodeError) as e:  # a folder, no permission, a name too long, not UTF-8, ...
        raise ConfigError("", _MISSING, f"cannot read: {e}", str(path)) from None
    return parse_toml(text, str(path))


def parse_toml(text: str, source: str | None = None) -> dict[str, Any]:
    """TOML text as a dict; a syntax error, or nesting deeper than the parser's recursion allows, becomes a
    ConfigError naming the source."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", _MISSING, f"not valid TOML: {e}", source) from None
    except RecursionError:
        raise ConfigError("", _MISSING, "not readable TOML: arrays or tables nested too deeply", source) from None


def to_dict(obj: Any) -> dict[str, Any]:
    """A dataclass as a plain dict (nested tables included), ready for TOML or HDF5 attributes."""
    return dataclasses.asdict(obj)


def with_overrides(obj: T, overrides: Mapping[str, Any], *, source: str | None = None) -> T:
    """A copy of a config with dotted updates applied (``{"device.c2c": 0.02}``), validated again."""
    data = to_dict(obj)
    for key, value in overrides.items():
        set_path(data, type(obj), key, value, source=source)
    return build(type(obj), data, source=source)


# A dotted path: keys of TOML's bare form (letters, digits, '_' and '-') joined by dots.
PATH_RE = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def set_path(data: dict[str, Any], cls: type, key: str, value: Any, *, source: str | None = None) -> None:
    """Set ``key`` (dotted) in ``data``, the plain-dict form of a ``cls`` instance (``to_dict``). Inside a
    settings class every part must name a field; inside a table-valued field (``dict``, e.g. a card's
    overrides) any key may be added, and missing tables on the way are created. ``build`` validates after."""
    if not PATH_RE.fullmatch(key):
        raise ConfigError(key, value, "not a dotted field name (letters, digits, '_', '-' joined by '.')", source)
    parts = key.split(".")
    node, tp = data, cls
    for i, part in enumerate(parts):
        sub = _dataclass_in(tp)
        if sub is not None:
            if part not in {f.name for f in dataclasses.fields(sub) if f.init}:
                raise ConfigError(key, value, "unknown field", source)
            child_tp = _hints(sub)[part]
        else:   # a table-valued field: free keys
            child_tp = Any
        if i == len(parts) - 1:
            node[part] = value
            return
        child = node.get(part)
        if child is None and sub is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(key, value, f"'{part}' is not a table of this configuration", source)
        node, tp = child, child_tp


def get_path(obj: Any, key: str) -> Any:
    """The value at a dotted path of a settings object (dataclass fields and table keys)."""
    node = obj
    for part in key.split("."):
        if dataclasses.is_dataclass(node) and part in {f.name for f in dataclasses.fields(node)}:
            node = getattr(node, part)
        elif isinstance(node, Mapping) and part in node:
            node = node[part]
        else:
            raise ConfigError(key, _MISSING, "unknown field")
    return node


def field_type(cls: type, key: str) -> Any:
    """The declared type at a dotted path of a settings class; ``Any`` below a table-valued field."""
    tp: Any = cls
    for part in key.split("."):
        sub = _dataclass_in(tp)
        if sub is None:
            if tp is Any or tp is dict or typing.get_origin(tp) is dict:
                return Any
            raise ConfigError(key, _MISSING, "unknown field")
        hints = _hints(sub)
        if part not in hints:
            raise ConfigError(key, _MISSING, "unknown field")
        tp = hints[part]
    return tp


# -- TOML literals and text --------------------------------------------------------------------------------------

def parse_literal(text: str) -> Any:
    """A command line's value as TOML reads it (``0.05``, ``[64, 32]``, ``true``, ``"x"``, ``{a = 1}``); a bare
    word that is not TOML (``dgc``, ``data/mnist``) is that string."""
    try:
        doc = tomllib.loads(f"x = {text}")
    except (tomllib.TOMLDecodeError, RecursionError):
        return text
    return doc["x"] if set(doc) == {"x"} else text


def parse_sets(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """``["a.b=1", "c=dgc"]`` -> ``{"a.b": 1, "c": "dgc"}``: each value a TOML literal (``parse_literal``).
    A key given twice is refused: which one was meant is unclear."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError("--set", item, "must be KEY=VALUE (e.g. device.overrides.step_dtod=0.05)")
        if not PATH_RE.fullmatch(key):
            raise ConfigError("--set", item, "KEY must be a dotted field name (letters, digits, '_', '-' joined "
                              "by '.')")
        value = parse_literal(text.strip())
        if key in out:
            raise ConfigError(key, value, "set twice")
        out[key] = value
    return out


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}
# Characters a basic TOML string must escape (control characters but tab, and DEL); a multi-line literal
# string may hold newlines and tabs as they are, nothing else of these.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_CONTROL_BUT_NEWLINE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else toml_string(key, multiline=False)


def toml_string(text: str, multiline: bool = True) -> str:
    """A TOML string that reads back as ``text``: a multi-line literal string where that is exact (readable
    notes), else a basic string with escapes."""
    if (multiline and "\n" in text and "'''" not in text and not text.endswith("'")
            and not _CONTROL_BUT_NEWLINE.search(text)):
        return "'''\n" + text + "'''"
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif _CONTROL.match(ch):
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_value(value: Any, where: str = "") -> str:
    """One TOML value: booleans, integers, floats (``repr`` reads back bit for bit; nan and inf as TOML
    spells them), strings, arrays and inline tables."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return toml_string(value, multiline=False)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v, where) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{toml_key(str(k))} = {toml_value(v, where)}" for k, v in value.items()) + "}"
    raise ConfigError(where, value, "cannot be written as TOML (TOML has no null and no objects)")


def dump_toml(data: Mapping[str, Any]) -> str:
    """Nested dicts as TOML text: each table's plain keys first, then its sub-tables as ``[a.b]`` sections
    (empty ones included, so that they read back as empty tables)."""
    lines: list[str] = []

    def table(node: Mapping[str, Any], path: tuple[str, ...]) -> None:
        for k, v in node.items():
            if not isinstance(v, Mapping):
                text = toml_string(v) if isinstance(v, str) else toml_value(v, ".".join((*path, str(k))))
                lines.append(f"{toml_key(str(k))} = {text}")
        for k, v in node.items():
            if isinstance(v, Mapping):
                sub = (*path, toml_key(str(k)))
                if lines:
                    lines.append("")
                lines.append("[" + ".".join(sub) + "]")
                table(v, sub)

    table(data, ())
    return "\n".join(lines) + "\n"
