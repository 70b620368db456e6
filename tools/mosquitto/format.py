"""What `linguamq sub` prints for one message: mosquitto_sub 2.0.11's ``print_message``
(payload only, ``-v``, ``-N``, ``-F`` with flags, widths, ``%``, ``@`` and ``\\``
sequences), byte for byte. Pure: a message and a clock in, bytes out.

``%j`` and ``%J`` are cJSON's output (mosquitto 2.0.11 is built with cJSON): the small
cJSON parser and printer below reproduce its number and string formats, its leniency
(leading zeros, raw control characters in strings) and its key order (duplicates kept).
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from typing import Any

from linguamq.tools.mosquitto.args import ClientConfig


@dataclasses.dataclass(frozen=True)
class Received:
    """One PUBLISH as the printer needs it. ``properties`` maps v5 property names
    (mosquitto's spelling, e.g. ``content-type``) to values; empty for v3.x."""

    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    mid: int = 0
    properties: tuple[tuple[str, Any], ...] = ()

    def prop(self, name: str) -> Any:
        return next((value for key, value in self.properties if key == name), None)


@dataclasses.dataclass(frozen=True)
class Clock:
    """The time a message is printed at: seconds and nanoseconds since the epoch."""

    seconds: int
    nanos: int

    @classmethod
    def now(cls) -> Clock:
        ns = time.time_ns()
        return cls(ns // 1_000_000_000, ns % 1_000_000_000)

    def local(self) -> time.struct_time:
        return time.localtime(self.seconds)


@dataclasses.dataclass
class Printed:
    """The bytes for stdout and the complaints for stderr (``err_printf``)."""

    out: bytearray = dataclasses.field(default_factory=bytearray)
    errors: list[str] = dataclasses.field(default_factory=list)


def print_message(cfg: ClientConfig, msg: Received, clock: Clock, shown: bytes | None = None) -> Printed:
    """``print_message``: ``shown`` replaces the payload where it is printed as text
    (``--decode``); ``%l``, ``%x``, ``%j``... always describe the payload itself."""
    result = Printed()
    text = msg.payload if shown is None else shown
    if cfg.format is not None:
        _formatted(cfg, msg, clock, text, result)
    elif cfg.verbose:
        if msg.payload:
            result.out += msg.topic.encode() + b" " + text + (b"\n" if cfg.eol else b"")
        elif cfg.eol:
            result.out += msg.topic.encode() + b" (null)\n"
    elif msg.payload:
        result.out += text + (b"\n" if cfg.eol else b"")
    return result


# --- -F --------------------------------------------------------------------------------

_ESCAPED = {ord("\\"): b"\\", ord("0"): b"\0", ord("a"): b"\a", ord("e"): b"\x1b", ord("n"): b"\n",
            ord("r"): b"\r", ord("t"): b"\t", ord("v"): b"\v"}


@dataclasses.dataclass(frozen=True)
class _Spec:
    align: str = ""  # "-": left
    pad: bytes = b" "
    width: int = 0
    precision: int = -1


def _formatted(cfg: ClientConfig, msg: Received, clock: Clock, text: bytes, result: Printed) -> None:
    fmt = cfg.format or b""
    n, i = len(fmt), 0
    while i < n:
        char = fmt[i]
        if char == ord("%"):
            if i < n - 1:
                i, spec = _parse_spec(fmt, i + 1)
                if i < n:
                    _percent(cfg, msg, clock, text, chr(fmt[i]), spec, result)
        elif char == ord("@"):
            if i < n - 1:
                i += 1
                result.out += b"@" if fmt[i] == ord("@") else _strftime_at(chr(fmt[i]), clock)
        elif char == ord("\\"):
            if i < n - 1:
                i += 1
                result.out += _ESCAPED.get(fmt[i], b"")
        else:
            result.out.append(char)
        i += 1
    if cfg.eol:
        result.out += b"\n"


def _parse_spec(fmt: bytes, i: int) -> tuple[int, _Spec]:
    """Flags, width and precision after ``%`` (formatted_print's scanning, quirks kept)."""
    n, align, pad, width, precision = len(fmt), "", b" ", 0, -1
    if fmt[i] == ord("-"):
        align = "-"
        i += 1 if i < n - 1 else 0
    if fmt[i] == ord("0"):
        pad = b"0"
        i += 1 if i < n - 1 else 0
    while i < n - 1 and 0x30 <= fmt[i] <= 0x39:
        width = width * 10 + fmt[i] - 0x30
        i += 1
    if fmt[i] == ord(".") and i < n - 1:
        i += 1
        precision = 0
        while i < n - 1 and 0x30 <= fmt[i] <= 0x39:
            precision = precision * 10 + fmt[i] - 0x30
            i += 1
    return i, _Spec(align, pad, width, precision)


def _percent(cfg: ClientConfig, msg: Received, clock: Clock, text: bytes, code: str, spec: _Spec,
             result: Printed) -> None:
    out = result.out
    match code:
        case "%":
            out += b"%"
        case "A" | "E" | "F" | "S":
            name = {"A": "topic-alias", "E": "message-expiry-interval", "F": "payload-format-indicator",
                    "S": "subscription-identifier"}[code]
            value = msg.prop(name)
            out += _int(value, spec) if value is not None else spec.pad * spec.width
        case "C" | "R":
            value = msg.prop("content-type" if code == "C" else "response-topic")
            if value is not None:
                out += _str(str(value).encode(), spec)
            elif code == "C":
                out += b" " * spec.width
        case "D":
            value = msg.prop("correlation-data")
            out += bytes(value) if value is not None else b""
        case "I":
            out += _str(time.strftime("%Y-%m-%dT%H:%M:%S%z", clock.local()).encode(), spec)
        case "j" | "J":
            _json(cfg, msg, clock, escaped=code == "j", result=result)
        case "l":
            out += _int(len(msg.payload), spec)
        case "m":
            out += _int(msg.mid, spec)
        case "P":
            pairs = [f"{k}:{v}".encode() for k, v in (msg.prop("user-property") or ())]
            out += b" ".join(pairs)
        case "p":
            out += _payload(text, 0, spec)
        case "q":
            out += bytes([0x30 + msg.qos])
        case "r":
            out += b"1" if msg.retain else b"0"
        case "t":
            out += _str(msg.topic.encode(), spec)
        case "U":
            out += f"{clock.seconds}.{clock.nanos:09d}".encode()
        case "x":
            out += _payload(msg.payload, 1, spec)
        case "X":
            out += _payload(msg.payload, 2, spec)


def _payload(payload: bytes, hexmode: int, spec: _Spec) -> bytes:
    """``write_payload``, including its quirks: a width cuts the payload (hex: to whole
    bytes), and a left-aligned field without a width is followed by as many spaces as
    the payload is long (C's ``printf("%*s", -n, "")``)."""
    length, width = len(payload), spec.width
    if width > 0:
        length = min(length, width)
        if hexmode:
            length //= 2
            padlen = width - 2 * length
        else:
            padlen = width - length
    else:
        padlen = width - length
    body = payload[:length]
    shown = body if hexmode == 0 else body.hex().encode() if hexmode == 1 else body.hex().upper().encode()
    if spec.align != "-":
        return spec.pad * max(padlen, 0) + shown
    return shown + b" " * abs(padlen)


def _int(value: int, spec: _Spec) -> bytes:
    if spec.width == 0:
        return str(value).encode()
    if spec.align == "-":
        return f"{value:<{spec.width}d}".encode()
    return (f"{value:0{spec.width}d}" if spec.pad == b"0" else f"{value:>{spec.width}d}").encode()


def _str(value: bytes, spec: _Spec) -> bytes:
    if spec.precision >= 0:
        value = value[:spec.precision]
    pad = b" " * max(spec.width - len(value), 0)
    return value + pad if spec.align == "-" else pad + value


def _strftime_at(code: str, clock: Clock) -> bytes:
    """``@X``: strftime's ``%X``, or ``@N``: the nanoseconds of the current second."""
    if code == "N":
        return f"{clock.nanos:09d}".encode()
    try:
        return time.strftime("%" + code, clock.local()).encode()
    except ValueError:
        return b""


# --- %j / %J ---------------------------------------------------------------------------

_PROPERTY_KEYS = ("payload-format-indicator", "message-expiry-interval", "content-type", "response-topic",
                  "correlation-data", "subscription-identifier", "topic-alias")


def _json(cfg: ClientConfig, msg: Received, clock: Clock, *, escaped: bool, result: Printed) -> None:
    tm = clock.local()
    tst = (time.strftime("%Y-%m-%dT%H:%M:%S", tm) + f".{clock.nanos // 1000:06d}Z" + time.strftime("%z", tm))
    root: list[tuple[bytes, Any]] = [(b"tst", tst.encode()), (b"topic", msg.topic.encode()), (b"qos", float(msg.qos)),
                                     (b"retain", float(msg.retain)), (b"payloadlen", float(len(msg.payload)))]
    if msg.qos > 0:
        root.append((b"mid", float(msg.mid)))
    if msg.properties:
        root.append((b"properties", _json_properties(msg)))
    if not msg.payload:
        payload: Any = None
    elif escaped:
        payload = msg.payload.split(b"\0", 1)[0]  # cJSON_CreateString stops at a NUL
    else:
        try:
            payload = parse_cjson(msg.payload)
        except ValueError:
            result.errors.append(f"Error: Message payload is not valid JSON on topic {msg.topic}.\n")
            return
    root.append((b"payload", payload))
    result.out += print_cjson(_Object(root), pretty=cfg.pretty)


def _json_properties(msg: Received) -> _Object:
    items: list[tuple[bytes, Any]] = []
    for key in _PROPERTY_KEYS:
        value = msg.prop(key)
        if value is None:
            continue
        if isinstance(value, (bytes, bytearray)):
            items.append((key.encode(), bytes(value).split(b"\0", 1)[0]))
        elif isinstance(value, str):
            items.append((key.encode(), value.encode()))
        else:
            items.append((key.encode(), float(value)))
    users = msg.prop("user-property")
    if users:
        items.append((b"user-properties", _Object([(k.encode(), v.encode()) for k, v in users])))
    return _Object(items)


class _Object(list):
    """A cJSON object: (key bytes, value) pairs in order, duplicates kept."""


_TRUE, _FALSE = object(), object()
_NUMBER_CHARS = frozenset(b"0123456789+-eE.")
_STRTOD = re.compile(rb"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_SIMPLE_ESCAPES = {ord("b"): b"\b", ord("f"): b"\f", ord("n"): b"\n", ord("r"): b"\r", ord("t"): b"\t",
                   ord('"'): b'"', ord("\\"): b"\\", ord("/"): b"/"}
_NESTING_LIMIT = 1000


def parse_cjson(data: bytes) -> Any:
    """cJSON_ParseWithOpts(require_null_terminated) on the whole payload; ValueError if
    cJSON (or mosquitto's whole-payload check) would reject it. Strings stay bytes,
    numbers are floats, objects are ``_Object``, true/false are sentinels."""
    if b"\0" in data:
        raise ValueError("embedded NUL")
    parser = _CJsonParser(data[3:] if data.startswith(b"\xef\xbb\xbf") else data)
    parser.skip()
    value = parser.value(0)
    parser.skip()
    if parser.pos != len(parser.data):
        raise ValueError("trailing characters")
    return value


class _CJsonParser:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def skip(self) -> None:
        while self.pos < len(self.data) and self.data[self.pos] <= 32:
            self.pos += 1

    def peek(self) -> int:
        if self.pos >= len(self.data):
            raise ValueError("unexpected end")
        return self.data[self.pos]

    def value(self, depth: int) -> Any:
        for word, value in ((b"null", None), (b"false", _FALSE), (b"true", _TRUE)):
            if self.data.startswith(word, self.pos):
                self.pos += len(word)
                return value
        char = self.peek()
        if char == ord('"'):
            return self.string()
        if char == ord("-") or 0x30 <= char <= 0x39:
            return self.number()
        if char in (ord("["), ord("{")):
            if depth >= _NESTING_LIMIT:
                raise ValueError("nested too deep")
            return self.array(depth + 1) if char == ord("[") else self.object(depth + 1)
        raise ValueError("unexpected character")

    def number(self) -> float:
        end = self.pos
        while end < len(self.data) and end - self.pos < 63 and self.data[end] in _NUMBER_CHARS:
            end += 1
        match = _STRTOD.match(self.data, self.pos, end)
        if not match:
            raise ValueError("bad number")
        self.pos = match.end()
        return float(match.group())

    def string(self) -> bytes:
        end = self.pos + 1
        while end < len(self.data) and self.data[end] != ord('"'):
            end += 2 if self.data[end] == ord("\\") else 1
        if end >= len(self.data):
            raise ValueError("unterminated string")
        raw, self.pos = self.data[self.pos + 1:end], end + 1
        out, i = bytearray(), 0
        while i < len(raw):
            if raw[i] != ord("\\"):
                out.append(raw[i])
                i += 1
                continue
            code = raw[i + 1]
            if code in _SIMPLE_ESCAPES:
                out += _SIMPLE_ESCAPES[code]
                i += 2
            elif code == ord("u"):
                char, i = _utf16_literal(raw, i)
                out += char.encode("utf-8")
            else:
                raise ValueError("bad escape")
        return bytes(out)

    def array(self, depth: int) -> list[Any]:
        self.pos += 1
        self.skip()
        if self.peek() == ord("]"):
            self.pos += 1
            return []
        items = []
        while True:
            self.skip()
            items.append(self.value(depth))
            self.skip()
            if self.peek() != ord(","):
                break
            self.pos += 1
        if self.peek() != ord("]"):
            raise ValueError("expected ]")
        self.pos += 1
        return items

    def object(self, depth: int) -> _Object:
        self.pos += 1
        self.skip()
        if self.peek() == ord("}"):
            self.pos += 1
            return _Object()
        items = _Object()
        while True:
            self.skip()
            if self.peek() != ord('"'):
                raise ValueError("expected a key")
            key = self.string()
            self.skip()
            if self.peek() != ord(":"):
                raise ValueError("expected :")
            self.pos += 1
            self.skip()
            items.append((key, self.value(depth)))
            self.skip()
            if self.peek() != ord(","):
                break
            self.pos += 1
        if self.peek() != ord("}"):
            raise ValueError("expected }")
        self.pos += 1
        return items


def _utf16_literal(raw: bytes, i: int) -> tuple[str, int]:
    """cJSON's ``utf16_literal_to_utf8`` for the ``\\u`` at ``raw[i]``: (character, next
    index). As in cJSON, a bad hex digit reads as 0 (a NUL, which ends the C string)."""
    def hex4(at: int) -> int:
        digits = raw[at:at + 4]
        return int(digits, 16) if all(chr(d) in "0123456789abcdefABCDEF" for d in digits) else 0
    if len(raw) - i < 6:
        raise ValueError("short \\u escape")
    first = hex4(i + 2)
    if 0xDC00 <= first <= 0xDFFF:
        raise ValueError("lone low surrogate")
    if 0xD800 <= first <= 0xDBFF:
        if len(raw) - (i + 6) < 6 or raw[i + 6:i + 8] != b"\\u":
            raise ValueError("lone high surrogate")
        second = hex4(i + 8)
        if not 0xDC00 <= second <= 0xDFFF:
            raise ValueError("bad surrogate pair")
        return chr(0x10000 + ((first & 0x3FF) << 10) + (second & 0x3FF)), i + 12
    return chr(first), i + 6


def print_cjson(value: Any, *, pretty: bool, depth: int = 0) -> bytes:
    """cJSON_PrintUnformatted / cJSON_Print (``pretty``)."""
    if value is None:
        return b"null"
    if value is _TRUE or value is _FALSE:
        return b"true" if value is _TRUE else b"false"
    if isinstance(value, float):
        return _cjson_number(value)
    if isinstance(value, (bytes, bytearray)):
        return _cjson_string(bytes(value))
    if isinstance(value, _Object):
        return _cjson_object(value, pretty, depth)
    sep = b", " if pretty else b","
    return b"[" + sep.join(print_cjson(v, pretty=pretty, depth=depth + 1) for v in value) + b"]"


def _cjson_object(items: _Object, pretty: bool, depth: int) -> bytes:
    out = bytearray(b"{\n" if pretty else b"{")
    for n, (key, item) in enumerate(items):
        if pretty:
            out += b"\t" * (depth + 1)
        out += _cjson_string(key) + (b":\t" if pretty else b":")
        out += print_cjson(item, pretty=pretty, depth=depth + 1)
        if n < len(items) - 1:
            out += b","
        if pretty:
            out += b"\n"
    if pretty:
        out += b"\t" * depth
    return bytes(out + b"}")


def _cjson_number(d: float) -> bytes:
    if math.isnan(d) or math.isinf(d):
        return b"null"
    text = format(d, "1.15g")  # cJSON 1.7: 15 digits if they give the number back, else 17
    test = float(text)
    if abs(test - d) > max(abs(test), abs(d)) * 2.220446049250313e-16:
        text = format(d, "1.17g")
    return text.encode()


_CJSON_ESCAPES = {0x22: b'\\"', 0x5C: b"\\\\", 0x08: b"\\b", 0x0C: b"\\f", 0x0A: b"\\n", 0x0D: b"\\r",
                  0x09: b"\\t"}


def _cjson_string(raw: bytes) -> bytes:
    out = bytearray(b'"')
    for byte in raw.split(b"\0", 1)[0]:  # a C string ends at its first NUL
        if byte > 31 and byte not in (0x22, 0x5C):
            out.append(byte)
        else:
            out += _CJSON_ESCAPES.get(byte) or b"\\u%04x" % byte
    return bytes(out + b'"')
