"""Malformed payloads for every kind of topic, deterministic by seed.

Used by the hostile-input case (tools/chaos/inputs.py), its tests and `linguamq bench
chaos`. Every payload made here must be *rejected* by the subscriber of its kind: the
case counts one ErrorReport per payload, so a payload that happened to be valid (a
``NodeControl`` that really changes the slowdown, an envelope a node would really run)
would be a false alarm, and worse, would act on the cluster. Hence:

- ``json_payloads(cls, ...)``: for a topic whose payload is the JSON message ``cls``;
  every item fails ``cls.from_json`` (random bytes, truncations, deep and huge JSON,
  NaN/inf, unknown versions and types, another message's valid JSON, each field given a
  value of the wrong type or out of range, ids that break topic rules, unknown fields).
- ``frame_payloads(kind, ...)``: envelopes (``LMQ1``) and blob chunks (``LMQB``) that fail
  their decoder (bad magic, truncated frames, header lengths past the end, headers
  declaring gigabytes, unknown dtypes, shape/body mismatches, more than ``limit`` bytes).
- ``act_payloads(...)``: envelopes that decode but that a node must refuse: stale or
  absurd epochs, positions past the session's cache, absurd steps, NaN/inf activations,
  token ids as floats, wrong ranks, a piece the node does not run.

Each item is a ``Fuzz(label, payload)``; item ``i`` of a stream depends only on (seed,
stream name, i), so a failure is reproduced by its index alone.
"""

from __future__ import annotations

import dataclasses
import json
import random
import struct
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal

import numpy as np

from linguamq.schemas import blobs, envelope, examples, frame
from linguamq.schemas.envelope import ActHeader
from linguamq.schemas.wire import MAX_STR, Message, Struct

DEEP = 100_000  # nesting depth of the "deep JSON" items
BAD_IDS = ("a/b", "+", "#", "", "x" * 65, "nul\u0000", "sp ace", "a/b/c/d", "é", "a+b#")
_LEN = struct.Struct("<I")


@dataclasses.dataclass(frozen=True)
class Fuzz:
    label: str  # what is wrong with it: "deep JSON", "field node: bad id"
    payload: bytes


Maker = Callable[[random.Random], Fuzz]


def _stream(name: str, makers: Sequence[Maker], n: int, seed: int) -> Iterator[Fuzz]:
    for i in range(n):
        rng = random.Random(f"{seed}:{name}:{i}")  # str seeds are hashed deterministically
        yield makers[i % len(makers)](rng)


# --- JSON messages ---------------------------------------------------------------------


def json_payloads(cls: type[Message], n: int, *, seed: int = 0) -> Iterator[Fuzz]:
    """``n`` payloads that ``cls.from_json`` rejects, cycling through every kind."""
    valid = examples.EXAMPLES[cls].to_dict()
    text = json.dumps(valid).encode()
    others = [m for c, m in examples.EXAMPLES.items() if c is not cls]

    def random_bytes(rng: random.Random) -> Fuzz:
        return Fuzz("random bytes", rng.randbytes(rng.randrange(0, 512)) + b"\xff")  # \xff: never UTF-8

    def truncated(rng: random.Random) -> Fuzz:
        return Fuzz("truncated JSON", text[:rng.randrange(0, len(text) - 1)])

    def deep(rng: random.Random) -> Fuzz:
        return Fuzz("deep JSON", b"[" * DEEP + b"]" * DEEP if rng.random() < 0.5 else b'{"a":' * DEEP + b"1" + b"}" * DEEP)

    def huge(rng: random.Random) -> Fuzz:
        over = rng.random() < 0.5  # just over the decoder's size bound, or just under it (and invalid)
        size = cls.MAX_BYTES + 1 if over else cls.MAX_BYTES - 64
        doc = json.dumps({**valid, "zz_pad": ""}).encode()
        pad = max(0, size - len(doc))
        return Fuzz("huge JSON (over the limit)" if over else "huge JSON (under the limit, unknown field)",
                    doc[:-2] + b'"' + b"x" * pad + b'"}')

    def non_finite(rng: random.Random) -> Fuzz:
        const = rng.choice([b"NaN", b"Infinity", b"-Infinity", b"1e999"])
        fields = _fields_of(cls)
        numeric = [f for f, h in fields if _base(h) in (int, float)] or [f for f, _ in fields]
        name = rng.choice(numeric)
        doc = json.dumps({**valid, name: "@@"}).encode().replace(b'"@@"', const)
        return Fuzz(f"{const.decode()} in field {name}", doc)

    def version(rng: random.Random) -> Fuzz:
        v = rng.choice([cls.VERSION + 1, 0, -1, "1", None, 1.5, 2**70])
        return Fuzz(f"unknown version {v!r}", json.dumps({**valid, "v": v}).encode())

    def type_tag(rng: random.Random) -> Fuzz:
        tag = rng.choice(["nope", "", cls.TYPE.upper(), 1, None])
        return Fuzz(f"unknown type {tag!r}", json.dumps({**valid, "type": tag}).encode())

    def other_message(rng: random.Random) -> Fuzz:
        other = rng.choice(others)
        return Fuzz(f"valid {other.TYPE} (wrong message type)", other.to_json())

    def not_an_object(rng: random.Random) -> Fuzz:
        return Fuzz("JSON that is not an object", rng.choice([b"[]", b"1", b'"x"', b"null", b"true", b"[{}]"]))

    def bad_field(rng: random.Random) -> Fuzz:
        name, hint = rng.choice(_fields_of(cls))
        f = {f.name: f for f in dataclasses.fields(cls)}[name]
        label, value = _bad_value(rng, hint, f.metadata)
        return Fuzz(f"field {name}: {label}", json.dumps({**valid, name: value}).encode())

    def bad_id(rng: random.Random) -> Fuzz:
        ids = [f.name for f in dataclasses.fields(cls) if getattr(f.metadata.get("pattern"), "pattern", "")
               .startswith("^[A-Za-z0-9_-]")]
        if not ids:
            return bad_field(rng)
        name, value = rng.choice(ids), rng.choice(BAD_IDS)
        return Fuzz(f"field {name}: id {value[:12]!r} breaks topic rules", json.dumps({**valid, name: value}).encode())

    def missing(rng: random.Random) -> Fuzz:
        required = [f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
        if not required:
            return bad_field(rng)
        name = rng.choice(required)
        return Fuzz(f"missing field {name}", json.dumps({k: v for k, v in valid.items() if k != name}).encode())

    def unknown_field(rng: random.Random) -> Fuzz:
        return Fuzz("unknown field", json.dumps({**valid, f"zz{rng.randrange(100)}": 1}).encode())

    makers = [random_bytes, truncated, deep, huge, non_finite, version, type_tag, other_message, not_an_object,
              bad_field, bad_id, missing, unknown_field, bad_field]
    return _stream(cls.TYPE, makers, n, seed)


def _fields_of(cls: type) -> list[tuple[str, Any]]:
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name]) for f in dataclasses.fields(cls)]


def _base(hint: Any) -> Any:
    """``X`` of ``X | None``; the hint itself otherwise."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0] if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1 else hint


def _bad_value(rng: random.Random, hint: Any, meta: typing.Mapping[str, Any]) -> tuple[str, Any]:
    """A JSON value that a field of type ``hint`` (with bounds ``meta``) never accepts."""
    optional = type(None) in typing.get_args(hint)
    for _ in range(100):
        label, value = _bad_value_of(rng, _base(hint), meta)
        if not (optional and value is None):  # null is a valid value of an optional field
            return label, value
    raise AssertionError("unreachable: every kind has a non-null bad value")


def _bad_value_of(rng: random.Random, hint: Any, meta: typing.Mapping[str, Any]) -> tuple[str, Any]:
    origin = typing.get_origin(hint)
    if hint is bool:
        return "not a boolean", rng.choice(["yes", 1, [], None])
    if hint is int:
        return rng.choice([("absurd integer", 2**70), ("absurd negative", -2**70), ("fraction", 1.5),
                           ("string", "12"), ("boolean", True), ("null", None)])
    if hint is float:
        return rng.choice([("string", "1.0"), ("array", [1.0]), ("boolean", False), ("null", None),
                           ("too big for a float", 10**400)])
    if hint is str:
        limit = meta.get("max_len") or MAX_STR
        return rng.choice([("number", 12345), ("array", ["x"]), ("null", None),
                           (f"longer than {limit}", "x" * (limit + 1))])
    if origin is Literal:
        return "not one of the choices", "zz-not-a-choice"
    if origin is tuple:
        return rng.choice([("object for an array", {"a": 1}), ("string for an array", "x"),
                           ("array of arrays", [[[]]]), ("null", None)])
    if isinstance(hint, type) and issubclass(hint, Struct):
        return rng.choice([("array for an object", []), ("unknown nested field", {"zz": 1}), ("null", None)])
    return "array of objects", [{}]  # unions (int | str): neither


# --- frames: envelopes and blob chunks -------------------------------------------------


def valid_envelope(*, session: str = "fz0", epoch: int = 1, piece: int = 0, start_pos: int = 0,
                   array: np.ndarray | None = None, **fields: Any) -> bytes:
    array = np.ones((1, 4), dtype=np.int64) if array is None else array
    header = ActHeader.for_tensor(array, session=session, step=fields.pop("step", 0), epoch=epoch, piece=piece,
                                  start_pos=start_pos, **fields)
    return envelope.encode(header, array)


def _header_doc(rng: random.Random) -> dict[str, Any]:
    return {"type": "act", "v": 1, "session": f"fz{rng.randrange(10**6)}", "request": None, "step": 0, "epoch": 1,
            "piece": 0, "dtype": "int64", "shape": [1, 4], "start_pos": 0, "sampling": None, "hops": [],
            "end": False}


def _frame(magic: bytes, header: bytes, body: bytes) -> bytes:
    return magic + _LEN.pack(len(header)) + header + body


def frame_payloads(kind: Literal["envelope", "blob_chunk"], n: int, *, seed: int = 0,
                   limit: int = envelope.DEFAULT_MAX_BYTES) -> Iterator[Fuzz]:
    """``n`` payloads that the decoder of ``kind`` rejects. ``limit``: the receiver's bound on
    a tensor's bytes (an envelope's ``max_bytes``); "oversized" items sit just over it."""
    magic = envelope.ACT_MAGIC if kind == "envelope" else blobs.BLOB_MAGIC
    if kind == "envelope":
        good = valid_envelope(array=np.arange(8, dtype=np.int64)[None])
        make_doc = _header_doc
    else:
        data = b"chunk-bytes" * 8
        good = blobs.encode_chunk(examples.SHA, 0, len(data), data)

        def make_doc(rng: random.Random) -> dict[str, Any]:
            return examples.EXAMPLES[blobs.BlobChunk].to_dict()

    def random_bytes(rng: random.Random) -> Fuzz:
        return Fuzz("random bytes", rng.randbytes(rng.randrange(0, 512)))

    def bad_magic(rng: random.Random) -> Fuzz:
        return Fuzz("bad magic", rng.choice([b"LMQ2", b"lmq1", b"\x00\x00\x00\x00", b"LMQB" if magic == b"LMQ1"
                                             else b"LMQ1"]) + good[4:])

    def truncated(rng: random.Random) -> Fuzz:
        return Fuzz("truncated frame", good[:rng.randrange(0, len(good) - 1)])

    def header_past_end(rng: random.Random) -> Fuzz:
        size = rng.choice([len(good), 2**20, frame.MAX_HEADER_BYTES + 1, 2**32 - 1])
        return Fuzz(f"header length {size} past the end", magic + _LEN.pack(size) + good[8:])

    def header_not_json(rng: random.Random) -> Fuzz:
        raw = rng.choice([rng.randbytes(64) + b"\xff", b"[" * 20_000 + b"]" * 20_000, b"{", b"NaN", b'{"a":1e999}'])
        return Fuzz("header not a JSON object of ours", _frame(magic, raw, b"\x00" * 32))

    def header_bad_field(rng: random.Random) -> Fuzz:
        doc = make_doc(rng)
        name = rng.choice(sorted(k for k in doc if k not in ("type", "v")))
        hint = dict(_fields_of(ActHeader if kind == "envelope" else blobs.BlobChunk))[name]
        cls = ActHeader if kind == "envelope" else blobs.BlobChunk
        label, value = _bad_value(rng, hint, {f.name: f for f in dataclasses.fields(cls)}[name].metadata)
        doc[name] = value
        return Fuzz(f"header field {name}: {label}", _frame(magic, json.dumps(doc).encode(), b"\x00" * 64))

    def header_version(rng: random.Random) -> Fuzz:
        doc = make_doc(rng)
        doc[rng.choice(["v", "type"])] = rng.choice([2, "x", None, 0])
        return Fuzz("unknown header version or type", _frame(magic, json.dumps(doc).encode(), b"\x00" * 32))

    if kind == "blob_chunk":
        def bad_hash(rng: random.Random) -> Fuzz:
            return Fuzz("chunk bytes do not match their hash", good[:-1] + bytes([good[-1] ^ 1]))

        makers = [random_bytes, bad_magic, truncated, header_past_end, header_not_json, header_bad_field,
                  header_version, bad_hash]
        return _stream(f"frame-{kind}", makers, n, seed)

    def gigabytes(rng: random.Random) -> Fuzz:
        doc = _header_doc(rng)
        doc.update(dtype="float32", shape=rng.choice([[1, 2**20, 2**20], [2**31, 2**31], [65536] * 8, [0, 2**62]]))
        return Fuzz(f"shape {doc['shape']} declares gigabytes", _frame(magic, json.dumps(doc).encode(), b"\x00" * 64))

    def wrong_dtype(rng: random.Random) -> Fuzz:
        doc = _header_doc(rng)
        doc["dtype"] = rng.choice(["float128", "object", "complex64", "int64 ", "<i8", "", "bfloat16x"])
        return Fuzz(f"dtype {doc['dtype']!r}", _frame(magic, json.dumps(doc).encode(), b"\x00" * 32))

    def mismatch(rng: random.Random) -> Fuzz:
        doc = _header_doc(rng)
        body = b"\x00" * (32 + rng.choice([-8, -1, 1, 8, 4096]))
        return Fuzz(f"body of {len(body)} bytes for int64[1, 4]", _frame(magic, json.dumps(doc).encode(), body))

    def bad_dims(rng: random.Random) -> Fuzz:
        doc = _header_doc(rng)
        doc["shape"] = rng.choice([[-1, 4], [1] * 9, [1, 4.5], ["1", 4], [1, None]])
        return Fuzz(f"shape {doc['shape']}", _frame(magic, json.dumps(doc).encode(), b"\x00" * 32))

    def bad_ids(rng: random.Random) -> Fuzz:
        doc = _header_doc(rng)
        doc[rng.choice(["session", "request"])] = rng.choice(BAD_IDS)
        return Fuzz("an id that breaks topic rules", _frame(magic, json.dumps(doc, ensure_ascii=False).encode(),
                                                            b"\x00" * 32))

    def oversized(rng: random.Random) -> Fuzz:
        doc = _header_doc(rng)
        count = limit // 8 + 1  # int64: one element over the limit
        doc["shape"] = [1, count]
        return Fuzz(f"tensor of {count * 8} bytes, over the {limit}-byte limit",
                    _frame(magic, json.dumps(doc).encode(), bytes(count * 8)))

    makers = [random_bytes, bad_magic, truncated, header_past_end, header_not_json, header_bad_field,
              header_version, gigabytes, wrong_dtype, mismatch, bad_dims, bad_ids]
    return _stream(f"frame-{kind}", [*makers, *([oversized] if limit < 8 * 2**20 else [])], n, seed)


# --- envelopes that decode but that a node refuses -------------------------------------


def act_payloads(n: int, *, seed: int = 0, epoch: int, piece: int, takes_ids: bool, hidden: int) -> Iterator[Fuzz]:
    """``n`` well-formed envelopes for ``act/{piece}`` that the node running ``piece`` under
    ``epoch`` must refuse (each with exactly one ErrorReport). Sessions are fresh ids
    (``fz...``), never a real request's: a fuzzer must not steer real sessions."""
    def session(rng: random.Random) -> str:
        return f"fz{rng.randrange(10**9)}"

    def good_input(rng: random.Random, steps: int = 3) -> np.ndarray:
        if takes_ids:
            return np.ones((1, steps), dtype=np.int64)
        return np.zeros((1, steps, hidden), dtype=np.float32)

    def stale(rng: random.Random) -> Fuzz:
        e = rng.choice([epoch + 1, epoch + 10**6, 2**62, 2**63 - 1] + ([epoch - 1] if epoch > 0 else []))
        return Fuzz(f"epoch {e} (node at {epoch})", valid_envelope(session=session(rng), epoch=e, piece=piece,
                                                                    array=good_input(rng)))

    def gap(rng: random.Random) -> Fuzz:
        pos = rng.choice([1, 7, 2**31, 2**62])
        return Fuzz(f"start_pos {pos} of an unknown session", valid_envelope(
            session=session(rng), epoch=epoch, piece=piece, start_pos=pos, array=good_input(rng)))

    def absurd_step(rng: random.Random) -> Fuzz:
        step = rng.choice([2**62, 2**63 - 1])
        return Fuzz(f"step {step} past the session's cache", valid_envelope(
            session=session(rng), epoch=epoch, piece=piece, step=step, start_pos=step, array=good_input(rng)))

    def non_finite(rng: random.Random) -> Fuzz:
        if takes_ids:  # token ids cannot be NaN: send NaN floats, refused as not token ids
            array = np.full((1, 2), np.nan, dtype=np.float32)
        else:
            array = good_input(rng)
            array = array.copy()
            array[0, rng.randrange(array.shape[1]), rng.randrange(hidden)] = rng.choice([np.nan, np.inf, -np.inf])
        return Fuzz("NaN/inf in the tensor", valid_envelope(session=session(rng), epoch=epoch, piece=piece,
                                                             array=array))

    def wrong_dtype(rng: random.Random) -> Fuzz:
        dtypes: list[type[np.generic]] = [np.float32, np.float16] if takes_ids else [np.int64, np.float16]
        array = np.ones((1, 3) if takes_ids else (1, 3, hidden), rng.choice(dtypes))  # ids: any int kind is accepted
        return Fuzz(f"dtype {array.dtype} for piece {piece}", valid_envelope(
            session=session(rng), epoch=epoch, piece=piece, array=array))

    def wrong_shape(rng: random.Random) -> Fuzz:
        shapes = [(2, 3), (3,), (1, 3, 1), ()] if takes_ids else [(1, 3, hidden + 1), (2, 3, hidden), (1, hidden)]
        shape = rng.choice(shapes)
        array = np.ones(shape, np.int64 if takes_ids else np.float32)
        return Fuzz(f"shape {shape} for piece {piece}", valid_envelope(session=session(rng), epoch=epoch,
                                                                        piece=piece, array=array))

    def other_piece(rng: random.Random) -> Fuzz:
        p = rng.choice([piece + 10_000, 999_999])
        return Fuzz(f"piece {p} this node does not run", valid_envelope(session=session(rng), epoch=epoch, piece=p,
                                                                        array=good_input(rng)))

    makers = [stale, gap, absurd_step, non_finite, wrong_dtype, wrong_shape, other_piece]
    return _stream(f"act-{piece}", makers, n, seed)
