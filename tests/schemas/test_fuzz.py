"""Every decoder we have, fed random bytes and mutated valid payloads.

Whatever arrives on a topic, a decoder may only raise SchemaError: never another
exception, a hang, or an allocation out of proportion to the payload (a declared size is
not a reason to allocate). What it accepts must survive a re-encode unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import hashlib
import importlib
import json
import math
import pkgutil
import signal
import struct
import time
import tracemalloc
import types
import typing
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import linguamq.schemas
from linguamq.schemas import blobs, envelope, examples, frame
from linguamq.schemas.errors import SchemaError
from linguamq.schemas.requests import Sampling
from linguamq.schemas.wire import MAX_INT, Message, Struct, message_types

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
FUZZ_EACH_MESSAGE = settings(FUZZ, max_examples=100)  # a dozen of them; the sweep covers each field
HANG_S = 5.0  # one decode of a few KiB takes microseconds; this is a hang on any machine
# JSON text becomes Python objects up to ~30x its size ("[{},{},...]"), so the bound is
# loose; what it catches is an allocation driven by a declared size (megabytes).
MEMORY_FACTOR, MEMORY_SLACK = 64, 1 << 20

SCHEMA_MODULES = [importlib.import_module(f"linguamq.schemas.{m.name}")
                  for m in pkgutil.iter_modules(linguamq.schemas.__path__)]
MESSAGES = sorted({cls for module in SCHEMA_MODULES for cls in message_types(module)}, key=lambda c: c.TYPE)
FRAMED = {"envelope": (envelope.ACT_MAGIC, envelope.decode), "blob_chunk": (blobs.BLOB_MAGIC, blobs.decode_chunk)}


def test_every_schema_module_is_fuzzed() -> None:
    names = {cls.__module__.rsplit(".", 1)[1] for cls in MESSAGES}
    assert {"manifest", "cluster", "requests", "blobs", "envelope"} <= names
    assert envelope.ActHeader in MESSAGES and blobs.BlobChunk in MESSAGES


# --- the harness -----------------------------------------------------------------------


@contextlib.contextmanager
def hang_guard(seconds: float) -> Iterator[None]:
    def on_alarm(signum: int, frame: Any) -> None:
        raise TimeoutError(f"decoder still running after {seconds} s")
    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_decoder(decode: Callable[[Any], Any], payload: Any, *, memory: bool = True) -> Any:
    """decode(payload), or None on SchemaError; any other exception propagates. With
    ``memory``, also bound what the decode allocates (tracemalloc slows it down 3x)."""
    size = memoryview(payload).nbytes
    traced = memory and not tracemalloc.is_tracing()
    if traced:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        with hang_guard(HANG_S):
            result = decode(payload)
    except SchemaError:
        result = None
    finally:
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] if traced else 0
        if traced:
            tracemalloc.stop()
    assert elapsed < HANG_S, f"decoding {size} bytes took {elapsed:.1f} s"
    assert peak <= MEMORY_FACTOR * size + MEMORY_SLACK, f"decoding {size} bytes allocated {peak} bytes"
    return result


def returned_bytes(result: Any) -> int:
    """What a decoder handed back that is not an object built from the header."""
    if isinstance(result, tuple):
        return sum(returned_bytes(r) for r in result)
    return result.nbytes if isinstance(result, np.ndarray | memoryview) else 0


# --- valid payloads, generated from the wire types themselves ----------------------------

def value_of(hint: Any, meta: typing.Mapping[str, Any]) -> st.SearchStrategy[Any]:
    """JSON values that satisfy ``hint`` and its spec bounds (most of the time: cross-field
    checks in ``__post_init__`` are not modelled, and need not be for a seed)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    ge, le, gt = meta.get("ge"), meta.get("le"), meta.get("gt")
    if origin is tuple:
        each = {k: v for k, v in meta.items() if k != "max_len"}
        return st.lists(value_of(args[0], each), max_size=min(meta.get("max_len") or 3, 3))
    if origin in (typing.Union, types.UnionType):
        return st.one_of([st.none() if a is type(None) else value_of(a, meta) for a in args])
    if origin is Literal:
        return st.sampled_from(args)
    if isinstance(hint, type) and issubclass(hint, Struct):
        return object_of(hint)
    if hint is bool:
        return st.booleans()
    if hint is int:
        low = ge if ge is not None else (math.floor(gt) + 1 if gt is not None else -MAX_INT - 1)
        return st.integers(int(low), int(le) if le is not None else MAX_INT)
    if hint is float:
        return st.floats(min_value=ge if ge is not None else gt, max_value=le, exclude_min=gt is not None,
                         allow_nan=False, allow_infinity=False)
    if hint is str:
        if meta.get("pattern") is not None:
            return st.from_regex(meta["pattern"].pattern, fullmatch=True)
        return st.text(max_size=min(meta.get("max_len") or 16, 16))
    raise TypeError(f"no strategy for {hint!r}")


@functools.cache  # building strategies is costly: once per class, not per example
def object_of(cls: type[Struct]) -> st.SearchStrategy[dict[str, Any]]:
    hints = typing.get_type_hints(cls)
    required, optional = {}, {}
    for f in dataclasses.fields(cls):
        strategy = value_of(hints[f.name], f.metadata)
        has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
        (optional if has_default else required)[f.name] = strategy
    if issubclass(cls, Message):
        required.update(type=st.just(cls.TYPE), v=st.just(cls.VERSION))
    return st.fixed_dictionaries(required, optional=optional)


@functools.cache
def message_inputs(cls: type[Message]) -> st.SearchStrategy[Any]:
    return inputs(message_seed(cls))


def message_seed(cls: type[Message]) -> st.SearchStrategy[bytes]:
    generated = object_of(cls).map(lambda d: json.dumps(d).encode())
    return st.one_of(st.just(example_of(cls).to_json()), generated)


@st.composite
def envelope_seed(draw: st.DrawFn) -> bytes:
    try:
        header = envelope.ActHeader.from_dict(draw(object_of(envelope.ActHeader)))
    except SchemaError:  # e.g. a generated hop with first > last
        header = envelope.ActHeader(session="s", step=0, epoch=0, piece=0, dtype="float32", shape=(), start_pos=0)
    dtype = draw(st.sampled_from(sorted(envelope.WIRE_DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 5), max_size=4)))
    array = np.arange(math.prod(shape)).astype(dtype).reshape(shape)
    return envelope.encode(dataclasses.replace(header, dtype=dtype, shape=shape), array)


@st.composite
def blob_seed(draw: st.DrawFn) -> bytes:
    data = draw(st.binary(max_size=256))
    offset = draw(st.integers(0, 1 << 20))
    total = offset + len(data) + draw(st.integers(0, 1 << 20))
    whole = hashlib.sha256(draw(st.binary(max_size=8))).hexdigest()
    return blobs.encode_chunk(whole, offset, total, data)


# --- mutations -------------------------------------------------------------------------

# Values that break naive decoders: bounds +-1, 64-bit edges, numbers no float holds,
# lone surrogates, wrong types, and shapes that declare anything up to exabytes ([-2, -4]
# has as many items as the sweep's envelope body: only the sign check stops it).
ODD_NUMBERS = [-1, 0, 1, 2**31, 2**32, 2**53 + 1, MAX_INT, MAX_INT + 1, 2**64, -MAX_INT - 2, 10**400, -10**400,
               1.5, -0.0, 16.0, 1e308, -1e308, math.nan, math.inf]
ODD_STRINGS = ["", "act", "float32", "int64", "\ud800", "a" * 65, "0" * 64, "\u00e9", "\x00", "a\n"]
ODD_OTHERS = [True, False, None, [], {}, [None], {"": None}, [2**20, 16], [MAX_INT] * 8, [-1, -1], [-2, -4],
              [0, 2**40], [1] * 9, [1.0, 2.0]]
ODD_VALUES = ODD_NUMBERS + ODD_STRINGS + ODD_OTHERS
JSON_VALUES = st.one_of(st.sampled_from(ODD_NUMBERS), st.sampled_from(ODD_STRINGS), st.sampled_from(ODD_OTHERS),
                        st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=12)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
))
SHAPES = st.lists(st.one_of(st.integers(0, 8), st.integers(0, 4096), st.sampled_from([2**20, 2**31, MAX_INT, -1])),
                  max_size=9)
# Fields that declare sizes or layouts: edited more often than their share of the paths.
SIZE_FIELDS = {"shape", "dtype", "offset", "total", "length"}


def json_paths(doc: Any, prefix: tuple = ()) -> Iterator[tuple]:
    yield prefix
    items = doc.items() if isinstance(doc, dict) else enumerate(doc) if isinstance(doc, list) else ()
    for key, value in items:
        yield from json_paths(value, (*prefix, key))


@st.composite
def mutate_json(draw: st.DrawFn, doc: Any) -> Any:
    """One structural change somewhere in a parsed JSON document (edited in place)."""
    paths = list(json_paths(doc))
    paths.append(paths.pop(0))  # the root last: hypothesis favours the first of sampled_from
    sized = [p for p in paths if p and p[-1] in SIZE_FIELDS]
    path = draw(st.sampled_from(paths) | st.sampled_from(sized)) if sized else draw(st.sampled_from(paths))
    if not path:
        return copy.deepcopy(draw(JSON_VALUES))  # copies: later edits must not touch the shared constants
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    key, op = path[-1], draw(st.sampled_from(["replace"] * 3 + ["shape"] * 2 + ["delete", "add", "repeat", "wrap"]))
    if op == "replace":
        parent[key] = copy.deepcopy(draw(JSON_VALUES))
    elif op == "shape":
        parent[key] = draw(SHAPES)
    elif op == "delete":
        del parent[key]
    elif op == "add" and isinstance(parent, dict):
        parent[draw(st.text(max_size=8))] = copy.deepcopy(draw(JSON_VALUES))
    elif op == "repeat":  # blow a collection past its max_len
        parent[key] = [parent[key]] * draw(st.sampled_from([2, 9, 17, 65]))
    else:
        parent[key] = [parent[key]]
    return doc


def edit_json(draw: st.DrawFn, raw: bytes) -> bytes | None:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    for _ in range(draw(st.integers(1, 3))):
        doc = draw(mutate_json(doc))
    return json.dumps(doc).encode()


# Plausible declared sizes: small, megabytes (allocating those is what must not happen), huge.
DIMS = st.one_of(st.integers(0, 8), st.integers(0, 4096), st.sampled_from([2**20, 2**31]))


def resize(draw: st.DrawFn, raw: bytes) -> bytes | None:
    """The header with its declared size changed and everything else left valid."""
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(doc, dict):
        return None
    if "shape" in doc:
        doc["shape"] = draw(st.lists(DIMS, max_size=4))
        doc["dtype"] = draw(st.sampled_from(sorted(envelope.WIRE_DTYPES)))
    if "total" in doc:
        doc["offset"], doc["total"] = draw(DIMS), draw(DIMS)
    return json.dumps(doc).encode()


def split_frame(payload: bytes) -> tuple[bytes, bytes, bytes] | None:
    if len(payload) < 8:
        return None
    (size,) = struct.unpack_from("<I", payload, 4)
    return payload[:4], payload[8:8 + size], payload[8 + size:]


@st.composite
def mutated(draw: st.DrawFn, seed: st.SearchStrategy[bytes], framed: bool) -> bytes:
    data = draw(seed)
    for _ in range(draw(st.integers(1, 3))):
        # most byte edits only exercise the JSON parser: edit the document as often as all of them
        op = draw(st.sampled_from(["json"] * 6 + ["resize"] * 3 + ["flip", "truncate", "splice", "insert", "delete",
                                                                   "duplicate", "length"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and data:
            i = min(at, len(data) - 1)
            data = data[:i] + bytes([data[i] ^ (1 << draw(st.integers(0, 7)))]) + data[i + 1:]
        elif op == "truncate":
            data = data[:at]
        elif op == "splice":
            other = draw(st.one_of(seed, st.binary(max_size=64)))
            data = data[:at] + other[draw(st.integers(0, len(other))):]
        elif op == "insert":
            data = data[:at] + draw(st.binary(min_size=1, max_size=16)) + data[at:]
        elif op == "delete":
            data = data[:at] + data[at + draw(st.integers(1, 16)):]
        elif op == "duplicate":
            data = data[:at] + data[at:at + draw(st.integers(1, 64))] * draw(st.integers(2, 8)) + data[at:]
        elif op == "json":
            parts = split_frame(data) if framed else (b"", data, b"")
            if parts is not None and (edited := edit_json(draw, parts[1])) is not None:
                head = parts[0] + struct.pack("<I", len(edited)) if framed else b""
                data = head + edited + parts[2]
        elif op == "resize" and framed and (parts := split_frame(data)) is not None:
            resized = resize(draw, parts[1])
            if resized is not None:
                data = parts[0] + struct.pack("<I", len(resized)) + resized + parts[2]
        elif op == "length" and framed and len(data) >= 8:
            size = draw(st.sampled_from([0, 1, 7, frame.MAX_HEADER_BYTES, frame.MAX_HEADER_BYTES + 1, 2**32 - 1])
                        | st.integers(0, len(data)))
            data = data[:4] + struct.pack("<I", size) + data[8:]
    return data


@st.composite
def resized(draw: st.DrawFn, seed: st.SearchStrategy[bytes]) -> bytes:
    """A valid frame whose header declares another size than its body has (or the same)."""
    magic, header, body = split_frame(draw(seed))
    header = resize(draw, header)
    return magic + struct.pack("<I", len(header)) + header + body


def inputs(seed: st.SearchStrategy[bytes], *, magic: bytes = b"", framed: bool = False) -> st.SearchStrategy[Any]:
    noise = st.binary(max_size=512)
    # mutated payloads more often than noise: they reach deeper
    raw = st.one_of(noise, noise.map(lambda b: magic + b) if magic else noise, mutated(seed, framed),
                    mutated(seed, framed), resized(seed) if framed else mutated(seed, framed))
    return st.tuples(raw, st.sampled_from([bytes, bytearray, memoryview])).map(lambda t: t[1](t[0]))


SEEDS = {"envelope": envelope_seed(), "blob_chunk": blob_seed()}
FRAMED_INPUTS = {name: inputs(SEEDS[name], magic=FRAMED[name][0], framed=True) for name in FRAMED}


# --- the sweep: every odd value at every place of a valid example (deterministic) -------

HOP = envelope.Hop(node="phone-1", first=1, last=2, t_recv=1.0, t_start=1.5, t_end=2.0, t_send=2.5)
ACT = envelope.ActHeader(session="s1", request="r1", step=3, epoch=2, piece=1, dtype="float32", shape=(1, 2, 4),
                         start_pos=7, sampling=Sampling(temperature=0.7, top_k=40), hops=(HOP,))
ACT_BODY = np.arange(8, dtype="<f4").tobytes()
BLOB_DATA = b"chunk of a blob"
BLOB_HEADER = blobs.BlobChunk(sha256="ab" * 32, offset=0, total=100, chunk_sha256=hashlib.sha256(BLOB_DATA).hexdigest())


def example_of(cls: type[Message]) -> Message:
    if cls is envelope.ActHeader:
        return ACT
    assert cls in examples.EXAMPLES, f"schemas/examples.py has no example of {cls.__name__}"
    return examples.EXAMPLES[cls]


def sweep_paths(doc: Any, prefix: tuple = ()) -> Iterator[tuple]:
    """Every place in ``doc``, visiting only the first item of each list (the rest are alike)."""
    yield prefix
    items = list(doc.items()) if isinstance(doc, dict) else list(enumerate(doc))[:1] if isinstance(doc, list) else []
    for key, value in items:
        yield from sweep_paths(value, (*prefix, key))


def one_change_everywhere(doc: dict) -> Iterator[bytes]:
    raw = json.dumps(doc)
    for path in sweep_paths(doc):
        for value in [*ODD_VALUES, "<delete>", "<add>"]:
            changed = json.loads(raw)
            parent = changed
            for key in path[:-1]:
                parent = parent[key]
            target = parent[path[-1]] if path else changed
            if value == "<add>":
                if not isinstance(target, dict):
                    continue
                target["unknown_field"] = 1
            elif value == "<delete>":
                if not path:
                    continue
                del parent[path[-1]]
            elif path:
                parent[path[-1]] = value
            else:
                changed = value
            yield json.dumps(changed).encode()


def framed(magic: bytes, body: bytes) -> Callable[[bytes], bytes]:
    return lambda header: magic + struct.pack("<I", len(header)) + header + body


SWEEPS = {
    **{cls.__name__: (cls.from_json, lambda cls=cls: example_of(cls).to_dict(), lambda raw: raw) for cls in MESSAGES},
    "envelope": (envelope.decode, ACT.to_dict, framed(envelope.ACT_MAGIC, ACT_BODY)),
    "blob_chunk": (blobs.decode_chunk, BLOB_HEADER.to_dict, framed(blobs.BLOB_MAGIC, BLOB_DATA)),
}


@pytest.mark.parametrize("name", sorted(SWEEPS))
def test_one_odd_value_anywhere_is_refused_or_survives_a_round_trip(name: str) -> None:
    decode, example, wrap = SWEEPS[name]
    assert run_decoder(decode, wrap(json.dumps(example()).encode())) is not None, "the example itself is refused"
    accepted = 0
    for raw in one_change_everywhere(example()):  # memory: only where a size is declared (and fast)
        result = run_decoder(decode, wrap(raw), memory=name in FRAMED)
        if isinstance(result, Message):
            assert type(result).from_json(result.to_json()) == result
        accepted += result is not None
    assert accepted > 0  # a few odd values are fine where they land (0 in a count, "" in free text)


# --- the properties --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(FRAMED))
@FUZZ
@given(data=st.data())
def test_a_framed_decoder_raises_only_schema_error(name: str, data: st.DataObject) -> None:
    _, decode = FRAMED[name]
    payload = data.draw(FRAMED_INPUTS[name])
    result = run_decoder(decode, payload)
    if result is None:
        return
    assert returned_bytes(result) <= len(payload)
    if name == "envelope":
        header, array = result
        assert not array.flags.writeable
        assert envelope.decode(envelope.encode(header, array))[0] == header


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda c: c.__name__)
@FUZZ_EACH_MESSAGE
@given(data=st.data())
def test_a_message_decoder_raises_only_schema_error(cls: type[Message], data: st.DataObject) -> None:
    payload = data.draw(message_inputs(cls))
    message = run_decoder(cls.from_json, payload)
    if message is not None:  # what we accept, we can send on unchanged
        assert cls.from_json(message.to_json()) == message


@FUZZ
@given(data=st.data())
def test_the_fast_header_path_never_disagrees_with_the_generic_decoder(data: st.DataObject) -> None:
    doc = data.draw(object_of(envelope.ActHeader))
    for _ in range(data.draw(st.integers(0, 3))):
        doc = data.draw(mutate_json(doc))
    doc = json.loads(json.dumps(doc))  # as a decoder would see it
    fast = envelope._accept_header(doc)
    try:
        generic = envelope.ActHeader.from_dict(doc)
    except SchemaError:
        generic = None
    if fast is not None:
        assert generic == fast
    if generic is not None:  # and it takes everything our own encoder writes
        assert envelope._accept_header(json.loads(generic.to_json())) == generic
