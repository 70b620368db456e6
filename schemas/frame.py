"""Binary frames: 4-byte magic, u32 little-endian header length, JSON header, raw body.

Readable from any language. The body is returned as a memoryview into the payload, so
a tensor or a blob chunk is never copied on decode.
"""

from __future__ import annotations

import struct as _struct

from linguamq.schemas.errors import SchemaError

MAX_HEADER_BYTES = 64 * 1024
_LEN = _struct.Struct("<I")


def pack(magic: bytes, header: bytes, body: bytes | bytearray | memoryview = b"") -> bytes:
    """Frame ``header`` and ``body``; one copy of the body (into the result)."""
    if len(header) > MAX_HEADER_BYTES:
        raise SchemaError(f"header of {len(header)} bytes exceeds {MAX_HEADER_BYTES}")
    return b"".join((magic, _LEN.pack(len(header)), header, body))


def unpack(magic: bytes, payload: bytes | bytearray | memoryview) -> tuple[memoryview, memoryview]:
    """Split a frame into (header bytes, body) views; SchemaError if it is not one."""
    view = memoryview(payload).cast("B") if not isinstance(payload, memoryview) else payload.cast("B")
    if len(view) < 8:
        raise SchemaError(f"frame of {len(view)} bytes is shorter than the 8-byte preamble")
    if view[:4] != magic:
        raise SchemaError(f"bad magic {bytes(view[:4])!r}, expected {magic!r}")
    (size,) = _LEN.unpack_from(view, 4)
    if size > MAX_HEADER_BYTES:
        raise SchemaError(f"header length {size} exceeds {MAX_HEADER_BYTES}")
    if 8 + size > len(view):
        raise SchemaError(f"header length {size} runs past the end of a {len(view)}-byte frame")
    return view[8:8 + size], view[8 + size:]
