"""The activation envelope on `act/{piece}` and `sessions/{session}/out`.

A binary frame (see ``frame``): magic ``LMQ1``, u32 little-endian header length, a JSON
``ActHeader``, then the tensor's raw little-endian C-order bytes. Readable from any
language: read 4 + 4 bytes, parse the JSON, view the rest as ``dtype`` with ``shape``.

The encoder pads the JSON header with spaces (legal JSON whitespace) so that the tensor
starts at a multiple of 16 bytes into the payload; decoders must not rely on it.

Decoding is zero-copy: the array is a read-only ``np.frombuffer`` view of the payload.
Nothing is allocated from a declared size: the declared byte count is checked against
``max_bytes`` and against the body's actual length before the array view is made.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing

import numpy as np

from linguamq.schemas import frame
from linguamq.schemas.errors import SchemaError
from linguamq.schemas.manifest import Dtype
from linguamq.schemas.requests import Sampling
from linguamq.schemas.wire import ID_PATTERN, MAX_INT, MAX_STR, Message, Struct, parse_json, spec, struct

ACT_MAGIC = b"LMQ1"
DEFAULT_MAX_BYTES = 256 * 1024 * 1024  # the largest tensor a decoder accepts by default
MAX_DIMS = 8
MAX_HOPS = 64
BODY_ALIGN = 16  # the encoder starts the tensor at a multiple of this offset

# Wire dtype name -> explicit little-endian numpy dtype (the names of manifest.Dtype).
WIRE_DTYPES: dict[Dtype, np.dtype] = {
    name: np.dtype(name).newbyteorder("<") for name in typing.get_args(Dtype)
}
# numpy dtype (either byte order) -> wire name; a dict lookup is ~10x cheaper than dtype.name
_WIRE_NAMES = {dt: name for name, wire in WIRE_DTYPES.items() for dt in (wire, wire.newbyteorder(">"))}


@struct
class Hop(Struct):
    """One stage's visit: which node ran which pieces, and when (its wall clock, seconds)."""

    node: str = spec(pattern=ID_PATTERN)
    first: int = spec(ge=0, doc="first piece the node ran")
    last: int = spec(ge=0, doc="last piece the node ran (inclusive)")
    t_recv: float = spec(ge=0, doc="envelope received")
    t_start: float = spec(ge=0, doc="compute started")
    t_end: float = spec(ge=0, doc="compute ended")
    t_send: float = spec(ge=0, doc="output published")

    def __post_init__(self) -> None:  # a new cross-field check here belongs in _build_acceptor too
        Struct.__post_init__(self)
        if self.first > self.last:
            raise SchemaError(f"first piece {self.first} is after last piece {self.last}", field="first")


@struct
class ActHeader(Message):
    """The JSON header of an activation envelope.

    ``step`` counts a session's generation steps (0: the prompt); a prompt sent in chunks
    has several envelopes with the same step and increasing ``start_pos``. ``chain``
    numbers the head's (re-)prefills: each starts a new chain of steps, and a stage drops
    an envelope of an older chain than one it has seen for the session (a retry never
    leaves two chains running). ``ring`` > 0 asks the tail to send the next step itself.
    """

    TYPE = "act"
    MAX_BYTES = frame.MAX_HEADER_BYTES

    session: str = spec(pattern=ID_PATTERN)
    request: str | None = spec(pattern=ID_PATTERN, default=None)
    step: int = spec(ge=0)
    epoch: int = spec(ge=0, doc="the plan epoch the sender worked under")
    piece: int = spec(ge=0, doc="the piece this tensor is the input of")
    dtype: Dtype
    shape: tuple[int, ...] = spec(max_len=MAX_DIMS, ge=0, doc="() is a scalar")
    start_pos: int = spec(ge=0, doc="absolute position of the first token; tokens are contiguous")
    sampling: Sampling | None = None
    hops: tuple[Hop, ...] = spec(max_len=MAX_HOPS, default=())
    end: bool = spec(default=False, doc="the session is over: free its state, compute nothing")
    more: bool = spec(default=False, doc="a chunk of a prompt with more chunks to come: the tail samples nothing")
    chain: int = spec(ge=0, default=0, doc="the head's (re-)prefill this step descends from; older chains are dropped")
    ring: int = spec(ge=0, default=0, doc="0: the head sends each step; n: the tail sends the next step itself "
                     "(to the first stage) while it is below n (max_tokens) and the token is not EOS")
    behind: int = spec(ge=0, le=4096, default=0,
                       doc="decode steps of the same batch published right after this one: the receiver "
                           "may wait a moment for them to batch them again")

    def __post_init__(self) -> None:  # a new cross-field check here belongs in _build_acceptor too
        Struct.__post_init__(self)
        for i, dim in enumerate(self.shape):  # numpy reads a negative dim as "infer": never let one by
            if dim < 0:
                raise SchemaError(f"dimension {dim} is negative", field=f"shape[{i}]")

    @classmethod
    def for_tensor(cls, array: np.ndarray, **fields: typing.Any) -> ActHeader:
        """A header whose dtype and shape are those of ``array``; ``fields`` give the rest."""
        return cls(dtype=_wire_dtype_name(array.dtype), shape=tuple(array.shape), **fields)

    @property
    def nbytes(self) -> int:
        """The tensor's size in bytes as declared (unbounded: check ``max_bytes`` first)."""
        return _declared_bytes(self, None)


# --- encode ----------------------------------------------------------------------------


def encode(header: ActHeader, array: np.ndarray, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Frame ``array`` under ``header``; one copy of the tensor (into the result).

    A non-contiguous or big-endian array is first made contiguous little-endian. The
    header's dtype and shape must be the array's (``ActHeader.for_tensor`` fills them).
    """
    arr = _wire_array(array)
    if WIRE_DTYPES[header.dtype] != arr.dtype:
        raise SchemaError(f"header says {header.dtype}, array is {arr.dtype}", field="dtype")
    if header.shape != arr.shape:
        raise SchemaError(f"header says {header.shape}, array is {arr.shape}", field="shape")
    if arr.nbytes > max_bytes:
        raise SchemaError(f"tensor of {arr.nbytes} bytes exceeds max_bytes {max_bytes}", field="shape")
    return _pack(header, arr)


def reframe(header: ActHeader, body: bytes | bytearray | memoryview) -> bytes:
    """Frame raw tensor bytes you did not change under a new header (no numpy round trip)."""
    view = memoryview(body).cast("B")
    if len(view) != header.nbytes:
        raise SchemaError(f"body of {len(view)} bytes, header declares {header.nbytes}", field="shape")
    return _pack(header, view)


def forward(payload: bytes | bytearray | memoryview, hop: Hop, *,
            max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The same envelope with ``hop`` appended to its trace (the oldest hops beyond
    ``MAX_HOPS`` are dropped: a trace is diagnostic and must not fail a request)."""
    if type(hop) is not Hop:
        raise SchemaError(f"expected a Hop, got {type(hop).__name__}", field="hops")
    header, body = decode_header(payload, max_bytes=max_bytes)
    return _pack(_with_hops(header, (*header.hops, hop)[-MAX_HOPS:]), body)


def _pack(header: ActHeader, body: typing.Any) -> bytes:
    raw = _header_json(header) if _accept_header else header.to_json()
    pad = -(8 + len(raw)) % BODY_ALIGN
    return frame.pack(ACT_MAGIC, raw + b" " * pad if pad else raw, body)


def _wire_array(array: np.ndarray) -> np.ndarray:
    arr = np.asarray(array)
    wire = WIRE_DTYPES[_wire_dtype_name(arr.dtype)]
    if arr.dtype != wire or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr, dtype=wire)
    return arr


def _wire_dtype_name(dtype: np.dtype) -> Dtype:
    name = _WIRE_NAMES.get(dtype)
    if name is None:
        raise SchemaError(f"dtype {dtype} is not one of {sorted(WIRE_DTYPES)}", field="dtype")
    return name


# --- decode ----------------------------------------------------------------------------


def decode(payload: bytes | bytearray | memoryview, *,
           max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[ActHeader, np.ndarray]:
    """-> (header, read-only array viewing the payload). SchemaError on any inconsistency.

    The array shares the payload's memory: it changes if a mutable payload (bytearray) does."""
    header, body = decode_header(payload, max_bytes=max_bytes)
    array = np.frombuffer(body, dtype=WIRE_DTYPES[header.dtype]).reshape(header.shape)
    array.flags.writeable = False
    return header, array


def decode_header(payload: bytes | bytearray | memoryview, *,
                  max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[ActHeader, memoryview]:
    """-> (header, body view) with the body's length checked: for forwarding and tracing."""
    raw_header, body = frame.unpack(ACT_MAGIC, payload)
    data = parse_json(raw_header, max_bytes=ActHeader.MAX_BYTES)
    header = _accept_header(data) if _accept_header else None
    if header is None:  # not the common well-formed case: the generic decoder decides and words the error
        header = ActHeader.from_dict(data)
    declared = _declared_bytes(header, max_bytes)
    if len(body) != declared:
        raise SchemaError(f"body of {len(body)} bytes, {header.dtype}{list(header.shape)} needs {declared}",
                          field="shape")
    return header, body


def _declared_bytes(header: ActHeader, max_bytes: int | None) -> int:
    """Declared size in bytes. With ``max_bytes``, SchemaError if the declared size, or the
    size with zero dims counted as 1 (numpy refuses such shapes too), exceeds it."""
    size = nonzero = WIRE_DTYPES[header.dtype].itemsize
    for dim in header.shape:
        size *= dim
        nonzero *= dim or 1
        if max_bytes is not None and nonzero > max_bytes:
            raise SchemaError(f"{header.dtype}{list(header.shape)} declares more than max_bytes {max_bytes}",
                              field="shape")
    return size


# --- fast path -------------------------------------------------------------------------
# The generic wire machinery costs ~100 us per header (it dominates small tensors). For
# the three structs of a header, "acceptors" compiled from the same field specs take a
# parsed JSON object and return the instance, or None whenever anything is unusual: then
# the generic decoder decides and words the error. An acceptor must never accept what
# the generic decoder rejects, nor build a different value (tests/schemas/test_fuzz.py
# checks both on mutated headers). A field it cannot compile disables the fast path.

_NO = object()  # "not accepted" from a field check
_Check = typing.Callable[[typing.Any], typing.Any]


def _range(meta: typing.Mapping[str, typing.Any]) -> tuple[float, float, float]:
    """(ge, le, gt) of a spec with absent bounds as infinities: ``ge <= x <= le and x > gt``."""
    def bound(key: str, absent: float) -> float:
        return absent if meta.get(key) is None else meta[key]
    return bound("ge", -math.inf), bound("le", math.inf), bound("gt", -math.inf)


def _scalar_check(hint: typing.Any, meta: typing.Mapping[str, typing.Any]) -> _Check | None:
    """value -> value (float for a JSON int in a float field) or _NO; None: not compilable."""
    ge, le, gt = _range(meta)
    if hint is bool:
        return lambda v: v if type(v) is bool else _NO
    if hint is int:
        lo, hi = max(ge, -MAX_INT - 1), min(le, MAX_INT)
        return lambda v: v if type(v) is int and lo <= v <= hi and v > gt else _NO
    if hint is float:
        def check_float(v: typing.Any) -> typing.Any:
            if type(v) is int and -MAX_INT - 1 <= v <= MAX_INT:
                v = float(v)
            return v if type(v) is float and ge <= v <= le and v > gt and math.isfinite(v) else _NO
        return check_float
    if hint is str:
        limit, pattern = meta.get("max_len") or MAX_STR, meta.get("pattern")
        # without a pattern, only ASCII: leave Unicode subtleties to the generic decoder
        return lambda v: v if type(v) is str and len(v) <= limit and (
            pattern.fullmatch(v) if pattern is not None else v.isascii()) else _NO
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint):
        rest = [a for a in typing.get_args(hint) if a is not type(None)]
        inner = _scalar_check(rest[0], meta) if len(rest) == 1 else None
        return None if inner is None else (lambda v: v if v is None else inner(v))
    return None


class _Acceptor:
    """JSON object -> instance of a wire class (``__init__`` and its checks skipped) or None."""

    def __init__(self, cls: type, *, tag: tuple[str, int] | None = None,
                 checks: typing.Mapping[str, _Check] | None = None,
                 valid: typing.Callable[[typing.Any], bool] = lambda obj: True) -> None:
        hints = typing.get_type_hints(cls)
        self.cls, self.tag, self.valid = cls, tag, valid
        self.fields: list[tuple[str, _Check, typing.Any]] = []
        for f in dataclasses.fields(cls):
            check = (checks or {}).get(f.name) or _scalar_check(hints[f.name], f.metadata)
            if check is None or f.default_factory is not dataclasses.MISSING:
                raise TypeError(f"cannot compile {cls.__name__}.{f.name}")
            self.fields.append((f.name, check, f.default))
        envelope = {"type", "v"} if tag else set()
        self.allowed = frozenset(name for name, _, _ in self.fields) | envelope
        self.required = frozenset(name for name, _, d in self.fields if d is dataclasses.MISSING) | envelope

    def __call__(self, data: typing.Any) -> typing.Any:
        if type(data) is not dict or not self.required <= data.keys() <= self.allowed:
            return None
        if self.tag and (data["type"] != self.tag[0] or type(data["v"]) is not int or data["v"] != self.tag[1]):
            return None
        obj: object = object.__new__(self.cls)
        for name, check, default in self.fields:
            value = check(data[name]) if name in data else default
            if value is _NO:
                return None
            object.__setattr__(obj, name, value)
        return obj if self.valid(obj) else None


def _tuple_check(item: _Check, max_len: int) -> _Check:
    def check(v: typing.Any) -> typing.Any:
        if type(v) is not list or len(v) > max_len:
            return _NO
        out = tuple(map(item, v))
        return _NO if any(x is _NO for x in out) else out
    return check


def _build_acceptor() -> _Acceptor | None:
    hints = typing.get_type_hints(ActHeader)
    if (hints["dtype"] is not Dtype or hints["shape"] != tuple[int, ...] or typing.get_args(hints["hops"]) != (Hop, ...)
            or Sampling.__post_init__ is not Struct.__post_init__):  # a cross-field check we would not know
        return None
    try:
        hop = _Acceptor(Hop, valid=lambda h: h.first <= h.last)  # Hop.__post_init__'s cross-field check
        sampling = _Acceptor(Sampling)
        sizes = {f.name: f.metadata["max_len"] for f in dataclasses.fields(ActHeader) if f.name in ("shape", "hops")}
        dim = _scalar_check(int, {"ge": 0})
        if dim is None:
            raise TypeError("cannot compile a dimension check")
        return _Acceptor(ActHeader, tag=(ActHeader.TYPE, ActHeader.VERSION), checks={
            "dtype": lambda v: v if type(v) is str and v in WIRE_DTYPES else _NO,
            "shape": _tuple_check(dim, sizes["shape"]),
            "sampling": lambda v: v if v is None else (sampling(v) or _NO),
            "hops": _tuple_check(lambda v: hop(v) or _NO, sizes["hops"]),
        })
    except TypeError:  # a field this fast path does not know: use the generic decoder
        return None


def _with_hops(header: ActHeader, hops: tuple[Hop, ...]) -> ActHeader:
    """``dataclasses.replace(header, hops=hops)`` without re-validating the fields that did
    not change (hops: Hop instances, at most MAX_HOPS, are valid by construction)."""
    new = object.__new__(ActHeader)
    new.__dict__.update(vars(header), hops=hops)
    return new


def _header_json(header: ActHeader) -> bytes:
    """``header.to_json()``, the same bytes, without the generic machinery."""
    data = {"type": ActHeader.TYPE, "v": ActHeader.VERSION, **vars(header)}
    if header.sampling is not None:
        data["sampling"] = vars(header.sampling)
    data["hops"] = [vars(hop) for hop in header.hops]
    return _JSON.encode(data).encode()


_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_accept_header = _build_acceptor()
