"""`linguamq sub --decode`: one of our messages as text a person can read.

The topic says what the payload is (``linguamq.topics.parse``); the payload is decoded
with the same decoder our processes use (``decoder_for``). JSON messages are pretty
printed; activation envelopes show their header and a tensor summary; blob chunks their
header and size. Nothing raw reaches the terminal: text with control characters and
binary that is not one of our frames become a hex summary, and characters that could
drive a terminal are escaped. Pure: (topic, payload) in, text out.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from linguamq.schemas.blobs import BlobChunk
from linguamq.schemas.envelope import ActHeader
from linguamq.schemas.errors import SchemaError
from linguamq.schemas.wire import Message
from linguamq.topics import Parsed, TopicError, parse
from linguamq.topics.client import decoder_for

HEX_PREVIEW = 32  # bytes of a binary payload shown in hex


def render(topic: str, payload: bytes) -> str:
    """The payload of ``topic`` as lines of text (no trailing newline)."""
    try:
        parsed = parse(topic)
    except TopicError:
        return render_raw(payload)
    head = describe(parsed)
    try:
        decoded = decoder_for(parsed.topic)(payload)
    except SchemaError as exc:
        return f"{head} (not a valid {parsed.kind}: {safe(str(exc))})\n{render_raw(payload)}"
    return f"{head}\n{render_decoded(decoded)}"


def describe(parsed: Parsed) -> str:
    """``node_status cluster=home node=phone-1``: the kind and the topic's placeholders."""
    params = " ".join(f"{name}={value}" for name, value in parsed.params.items())
    return f"{parsed.kind} cluster={parsed.cluster}" + (f" {params}" if params else "")


def render_decoded(decoded: Any) -> str:
    """A decoded payload: a Message, (ActHeader, array) or (BlobChunk, data)."""
    if isinstance(decoded, Message):
        return pretty_json(decoded.to_dict())
    header, body = decoded
    if isinstance(header, ActHeader):
        return f"{pretty_json(header.to_dict())}\n{tensor_summary(body)}"
    if isinstance(header, BlobChunk):
        return f"{pretty_json(header.to_dict())}\ndata: {len(body)} bytes"
    raise TypeError(f"cannot render {type(header).__name__}")


def tensor_summary(array: np.ndarray) -> str:
    """``tensor: float32 [1, 3, 64] min=-1.2 max=3.4 mean=0.01`` (stats over finite values)."""
    text = f"tensor: {array.dtype.name} {list(array.shape)}"
    if array.size == 0:
        return text + " (empty)"
    values = array.astype(np.float64).ravel()
    finite = values[np.isfinite(values)]
    if finite.size:
        text += f" min={finite.min():.6g} max={finite.max():.6g} mean={finite.mean():.6g}"
    if finite.size != values.size:
        text += f" non-finite={values.size - finite.size}"
    return text


def render_raw(payload: bytes) -> str:
    """A payload that is not one of our messages: JSON pretty printed, printable text as
    is, anything else as a hex summary."""
    if not payload:
        return "(empty)"
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return hex_summary(payload)
    try:
        return pretty_json(json.loads(text))
    except (ValueError, RecursionError):
        pass
    if all(char.isprintable() or char in "\n\t" for char in text):
        return text
    return hex_summary(payload)


def hex_summary(payload: bytes) -> str:
    """``<binary, 1234 bytes> 4c4d5131 0c000000 ...``."""
    head = payload[:HEX_PREVIEW].hex()
    groups = " ".join(head[i:i + 8] for i in range(0, len(head), 8))
    more = " ..." if len(payload) > HEX_PREVIEW else ""
    return f"<binary, {len(payload)} bytes> {groups}{more}"


def pretty_json(value: Any) -> str:
    """Indented JSON, with lists of scalars (shapes, token ids) kept on one line."""
    return safe(_pretty(value, ""))


def _pretty(value: Any, indent: str) -> str:
    inner = indent + "  "
    if isinstance(value, dict) and value:
        items = (f"{inner}{json.dumps(k, ensure_ascii=False)}: {_pretty(v, inner)}" for k, v in value.items())
        return "{\n" + ",\n".join(items) + f"\n{indent}}}"
    if isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        return "[\n" + ",\n".join(inner + _pretty(v, inner) for v in value) + f"\n{indent}]"
    return json.dumps(value, ensure_ascii=False, allow_nan=True)


def safe(text: str) -> str:
    """``text`` with every character a terminal could act on (controls, bidi overrides,
    other non-printables) written as an escape; newlines and tabs kept."""
    if all(char.isprintable() or char in "\n\t" for char in text):
        return text
    return "".join(char if char.isprintable() or char in "\n\t" else _escape(char) for char in text)


def _escape(char: str) -> str:
    code = ord(char)  # JSON's escape where it is one (in strings our JSON stays valid)
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
