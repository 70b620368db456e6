"""Chunked artifact transfer on `blobs/{sha256}/...`: a node asks, the hub answers in chunks.

A chunk is a binary frame (magic ``LMQB``) whose JSON header is a ``BlobChunk`` and whose
body is the chunk's bytes; the receiver checks each chunk's sha256 and, at the end, the
whole file's against the manifest.
"""

from __future__ import annotations

import hashlib

from linguamq.schemas import frame
from linguamq.schemas.errors import SchemaError
from linguamq.schemas.wire import ID_PATTERN, SHA256_PATTERN, Message, spec, struct

BLOB_MAGIC = b"LMQB"
MAX_CHUNK_BYTES = 8 * 1024 * 1024


@struct
class BlobRequest(Message):
    """Ask for ``length`` bytes of blob ``sha256`` from ``offset`` (resumable)."""

    TYPE = "blob_request"

    node: str = spec(pattern=ID_PATTERN)
    sha256: str = spec(pattern=SHA256_PATTERN)
    offset: int = spec(ge=0)
    length: int = spec(ge=1, le=MAX_CHUNK_BYTES)


@struct
class BlobChunk(Message):
    TYPE = "blob_chunk"

    sha256: str = spec(pattern=SHA256_PATTERN, doc="the whole blob's hash")
    offset: int = spec(ge=0)
    total: int = spec(ge=0, doc="the whole blob's size in bytes")
    chunk_sha256: str = spec(pattern=SHA256_PATTERN)


def encode_chunk(blob_sha256: str, offset: int, total: int, data: bytes | memoryview) -> bytes:
    header = BlobChunk(sha256=blob_sha256, offset=offset, total=total,
                       chunk_sha256=hashlib.sha256(data).hexdigest())
    return frame.pack(BLOB_MAGIC, header.to_json(), data)


def decode_chunk(payload: bytes | memoryview) -> tuple[BlobChunk, memoryview]:
    """-> (header, data view). Raises SchemaError on any inconsistency, hash included."""
    raw_header, data = frame.unpack(BLOB_MAGIC, payload)
    header = BlobChunk.from_json(raw_header)
    if len(data) > MAX_CHUNK_BYTES:
        raise SchemaError(f"chunk of {len(data)} bytes exceeds {MAX_CHUNK_BYTES}")
    if header.offset + len(data) > header.total:
        raise SchemaError(f"chunk [{header.offset}, {header.offset + len(data)}) runs past total {header.total}",
                          field="offset")
    if hashlib.sha256(data).hexdigest() != header.chunk_sha256:
        raise SchemaError("chunk bytes do not match chunk_sha256", field="chunk_sha256")
    return header, data
