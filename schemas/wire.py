"""Strict, frozen, versioned wire types built on dataclasses.

A wire type is a frozen keyword-only dataclass. Field types are read from annotations
and checked on construction and on decode: ``int`` (never ``bool``), ``float`` (an int is
accepted), ``str``, ``bool``, ``Literal[...]``, ``X | None``, ``int | str``,
``tuple[X, ...]`` and nested ``Struct`` classes. Bounds come from ``spec(...)``.

A ``Message`` is a top-level JSON document with a stable ``type`` tag and a ``v``
version; unknown fields, missing fields, wrong types, wrong versions and out-of-range
values all raise ``SchemaError`` naming the field. Decoding is bounded: payload size and
collection lengths are limited, and absurd nesting is caught from the parser.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import types
import typing
from typing import Any, ClassVar, Literal, Self

from linguamq.schemas.errors import SchemaError

MAX_JSON_BYTES = 1 << 20  # 1 MiB: the largest JSON document we ever accept
MAX_ITEMS = 65536  # default bound on any tuple field
MAX_STR = 65536  # default bound on any string field
MAX_INT = 2**63 - 1

def spec(*, ge: float | None = None, le: float | None = None, gt: float | None = None,
         max_len: int | None = None, pattern: str | None = None, default: Any = dataclasses.MISSING,
         doc: str = "") -> Any:
    """A field with bounds: numbers ``ge/le/gt``, strings and tuples ``max_len``, strings ``pattern``.

    On a tuple field, ``max_len`` bounds the tuple and the other bounds apply to each item."""
    meta = {"ge": ge, "le": le, "gt": gt, "max_len": max_len, "doc": doc,
            "pattern": re.compile(pattern) if pattern else None}
    return dataclasses.field(default=default, metadata=meta)


ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"


class Struct:
    """A nested wire object (no type tag). Subclasses are decorated with ``@struct``."""

    __dataclass_fields__: ClassVar[dict[str, dataclasses.Field[Any]]]  # set by @struct: every subclass is one

    def __post_init__(self) -> None:
        for f, hint in _fields(type(self)):
            _check(getattr(self, f.name), hint, f, f.name)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: _dump(getattr(self, f.name)) for f, _ in _fields(type(self))}

    @classmethod
    def from_dict(cls, data: Any, path: str = "") -> Self:
        if not isinstance(data, dict):
            raise SchemaError(f"expected an object, got {_kind(data)}", field=path)
        known = {f.name for f, _ in _fields(cls)}
        for key in data:
            if key not in known and key not in cls._envelope_keys():
                raise SchemaError("unknown field", field=_join(path, str(key)))
        values = {}
        for f, hint in _fields(cls):
            where = _join(path, f.name)
            if f.name in data:
                values[f.name] = _load(data[f.name], hint, f, where)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise SchemaError("missing field", field=where)
        try:
            return cls(**values)
        except SchemaError as exc:  # cross-field checks in __post_init__
            raise SchemaError(exc.reason, field=_join(path, exc.field)) from None

    @classmethod
    def _envelope_keys(cls) -> tuple[str, ...]:
        return ()


class Message(Struct):
    """A top-level JSON document: ``{"type": TYPE, "v": VERSION, ...fields}``."""

    TYPE: ClassVar[str]
    VERSION: ClassVar[int] = 1
    # Messages typed by people (mosquitto_pub) may leave out "type" and "v".
    TAG_OPTIONAL: ClassVar[bool] = False
    MAX_BYTES: ClassVar[int] = MAX_JSON_BYTES
    # Cross-field rules that JSON Schema can state too (merged into the message's schema file).
    SCHEMA_RULES: ClassVar[dict[str, Any]] = {}

    @classmethod
    def _envelope_keys(cls) -> tuple[str, ...]:
        return ("type", "v")

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.TYPE, "v": self.VERSION, **Struct.to_dict(self)}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode()

    @classmethod
    def from_json(cls, payload: bytes | bytearray | memoryview | str) -> Self:
        return cls.from_dict(parse_json(payload, max_bytes=cls.MAX_BYTES))

    @classmethod
    def from_dict(cls, data: Any, path: str = "") -> Self:
        if not isinstance(data, dict):
            raise SchemaError(f"expected a JSON object, got {_kind(data)}", field=path)
        if "type" in data or not cls.TAG_OPTIONAL:
            if data.get("type") != cls.TYPE:
                raise SchemaError(f"expected {cls.TYPE!r}, got {_short(data.get('type'))}",
                                  field=_join(path, "type"))
        if "v" in data or not cls.TAG_OPTIONAL:
            v = data.get("v")
            if type(v) is not int or v != cls.VERSION:
                raise SchemaError(f"unsupported version {_short(v)}, this build speaks {cls.VERSION}",
                                  field=_join(path, "v"))
        return super().from_dict(data, path)


_C = typing.TypeVar("_C")


@typing.dataclass_transform(frozen_default=True, kw_only_default=True, field_specifiers=(dataclasses.field, spec))
def struct(cls: type[_C]) -> type[_C]:
    """Decorator: make ``cls`` a frozen, keyword-only, slotted wire dataclass (type checkers
    see the dataclass through ``dataclass_transform``)."""
    return dataclasses.dataclass(frozen=True, kw_only=True)(cls)


def parse_json(payload: bytes | bytearray | memoryview | str, *, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """Parse JSON with a size bound; any failure (nesting included) is a SchemaError."""
    if len(payload) > max_bytes:
        raise SchemaError(f"payload of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    try:
        text = payload if isinstance(payload, str) else bytes(payload).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SchemaError(f"payload is not UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:  # the C parser raises RecursionError on absurd nesting: no pre-scan needed
        return json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise SchemaError(f"payload is not valid JSON ({exc})") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# --- field machinery -------------------------------------------------------------------

_FIELD_CACHE: dict[type, tuple[tuple[dataclasses.Field, Any], ...]] = {}


def _fields(cls: type) -> tuple[tuple[dataclasses.Field, Any], ...]:
    cached = _FIELD_CACHE.get(cls)
    if cached is None:
        hints = typing.get_type_hints(cls)
        cached = tuple((f, hints[f.name]) for f in dataclasses.fields(cls))
        _FIELD_CACHE[cls] = cached
    return cached


def _meta(f: dataclasses.Field | _Items | None, key: str) -> Any:
    return f.metadata.get(key) if f is not None else None


class _Items:
    """The bounds of a tuple field as they apply to each item (all but ``max_len``)."""

    def __init__(self, f: dataclasses.Field | _Items | None) -> None:
        meta = f.metadata if f is not None else {}
        self.metadata: dict[str, Any] = {k: v for k, v in meta.items() if k != "max_len"}


def items_of(f: dataclasses.Field | _Items | None) -> _Items:
    return _Items(f)


def _load(value: Any, hint: Any, f: dataclasses.Field | _Items | None, path: str) -> Any:
    """JSON value -> Python value of type ``hint`` (tuples from lists, structs from dicts)."""
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, list):
            raise SchemaError(f"expected an array, got {_kind(value)}", field=path)
        _check_len(value, f, path)
        item, each = typing.get_args(hint)[0], _Items(f)
        return tuple(_load(v, item, each, f"{path}[{i}]") for i, v in enumerate(value))
    if origin in (types.UnionType, typing.Union):
        return _load_union(value, hint, f, path)
    if isinstance(hint, type) and issubclass(hint, Struct):
        return hint.from_dict(value, path)
    if hint is float and type(value) is int:
        if abs(value) > _FLOAT_INT_MAX:  # float() would raise OverflowError
            raise SchemaError("number out of range", field=path)
        return float(value)
    if hint is int and type(value) is float and value.is_integer() and abs(value) <= MAX_INT:
        return int(value)  # JSON has one number type: 16.0 is the integer 16 (as in JSON Schema)
    return value  # scalars are checked by _check in __post_init__


def _load_union(value: Any, hint: Any, f: dataclasses.Field | _Items | None, path: str) -> Any:
    args = typing.get_args(hint)
    if value is None and type(None) in args:
        return None
    last: SchemaError | None = None
    for arg in (a for a in args if a is not type(None)):
        try:
            loaded = _load(value, arg, f, path)
            _check(loaded, arg, f, path)
            return loaded
        except SchemaError as exc:
            last = exc
    assert last is not None
    raise last


def _check(value: Any, hint: Any, f: dataclasses.Field | _Items | None, path: str) -> None:
    origin = typing.get_origin(hint)
    if origin is tuple:
        if not isinstance(value, tuple):
            raise SchemaError(f"expected a tuple, got {_kind(value)}", field=path)
        _check_len(value, f, path)
        item, each = typing.get_args(hint)[0], _Items(f)
        for i, v in enumerate(value):
            _check(v, item, each, f"{path}[{i}]")
        return
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check(value, arg, f, path)
            except SchemaError as exc:
                errors.append(exc.reason)
        raise SchemaError(" or ".join(errors), field=path)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed or type(value) is bool:
            raise SchemaError(f"expected one of {list(allowed)}, got {_short(value)}", field=path)
        return
    if isinstance(hint, type) and issubclass(hint, Struct):
        if not isinstance(value, hint):
            raise SchemaError(f"expected {hint.__name__}, got {_kind(value)}", field=path)
        return
    _check_scalar(value, hint, f, path)


def _check_scalar(value: Any, hint: Any, f: dataclasses.Field | _Items | None, path: str) -> None:
    if hint is bool:
        if type(value) is not bool:
            raise SchemaError(f"expected true/false, got {_kind(value)}", field=path)
    elif hint is int:
        if type(value) is not int:
            raise SchemaError(f"expected an integer, got {_kind(value)}", field=path)
        if not -MAX_INT - 1 <= value <= MAX_INT:
            raise SchemaError("integer out of 64-bit range", field=path)
        _check_range(value, f, path)
    elif hint is float:
        if type(value) not in (float, int) or not math.isfinite(value):
            raise SchemaError(f"expected a finite number, got {_kind(value)}", field=path)
        _check_range(value, f, path)
    elif hint is str:
        if type(value) is not str:
            raise SchemaError(f"expected a string, got {_kind(value)}", field=path)
        if not value.isascii() and not _is_unicode(value):  # JSON's "\ud800" parses, but never encodes
            raise SchemaError("string holds a lone surrogate (not valid Unicode)", field=path)
        _check_len(value, f, path)
        pattern = _meta(f, "pattern")
        if pattern is not None and not pattern.fullmatch(value):
            raise SchemaError(f"{_short(value)} does not match {pattern.pattern}", field=path)
    else:  # pragma: no cover - a programming error in a schema definition
        raise TypeError(f"unsupported wire type {hint!r} at {path}")


_FLOAT_INT_MAX = int(sys.float_info.max)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_range(value: float, f: dataclasses.Field | _Items | None, path: str) -> None:
    ge, le, gt = _meta(f, "ge"), _meta(f, "le"), _meta(f, "gt")
    if ge is not None and value < ge:
        raise SchemaError(f"{value} is below the minimum {ge}", field=path)
    if gt is not None and value <= gt:
        raise SchemaError(f"{value} must be greater than {gt}", field=path)
    if le is not None and value > le:
        raise SchemaError(f"{value} is above the maximum {le}", field=path)


def _check_len(value: Any, f: dataclasses.Field | _Items | None, path: str) -> None:
    limit = _meta(f, "max_len") or (MAX_STR if isinstance(value, str) else MAX_ITEMS)
    if len(value) > limit:
        raise SchemaError(f"length {len(value)} exceeds the maximum {limit}", field=path)


def _dump(value: Any) -> Any:
    if isinstance(value, Struct):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_dump(v) for v in value]
    return value


def _join(path: str, name: str) -> str:
    if not name:
        return path
    return f"{path}.{name}" if path and not name.startswith("[") else f"{path}{name}"


def _kind(value: Any) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "an array", dict: "an object", type(None): "null", tuple: "a tuple"}
    return names.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def message_types(module: types.ModuleType) -> list[type[Message]]:
    """Every concrete Message class defined in ``module`` (for registries and tests)."""
    return [v for v in vars(module).values()
            if isinstance(v, type) and issubclass(v, Message) and v is not Message
            and v.__module__ == module.__name__]
