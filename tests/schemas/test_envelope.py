"""The activation envelope: round trips, zero-copy decode, and every way a payload is refused."""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest

from linguamq.schemas import envelope, frame
from linguamq.schemas.envelope import ActHeader, Hop
from linguamq.schemas.errors import SchemaError
from linguamq.schemas.requests import Sampling

DTYPES = ("float32", "float16", "int64", "int32")
SHAPES = [(), (1,), (0,), (3, 0), (0, 5), (1, 7, 16), (2, 3, 4, 1), (1,) * 8]
HOP = Hop(node="phone-1", first=1, last=4, t_recv=10.0, t_start=10.001, t_end=10.02, t_send=10.021)


def header_for(array: np.ndarray, **fields) -> ActHeader:
    base = {"session": "s1", "step": 3, "epoch": 2, "piece": 1, "start_pos": 17}
    return ActHeader.for_tensor(array, **{**base, **fields})


def payload_for(array: np.ndarray, **fields) -> bytes:
    return envelope.encode(header_for(array, **fields), array)


def split(payload: bytes) -> tuple[dict, bytes]:
    (size,) = struct.unpack_from("<I", payload, 4)
    return json.loads(payload[8:8 + size]), payload[8 + size:]


def reframe_raw(header: dict, body: bytes, magic: bytes = b"LMQ1", edit: tuple[bytes, bytes] = (b"", b"")) -> bytes:
    raw = json.dumps(header).encode().replace(*edit)
    return magic + struct.pack("<I", len(raw)) + raw + body


def refused(payload, field: str | None = None, match: str | None = None, **kwargs) -> SchemaError:
    with pytest.raises(SchemaError, match=match) as info:
        envelope.decode(payload, **kwargs)
    if field is not None:
        assert info.value.field == field, str(info.value)
    return info.value


# --- round trips -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_round_trip_every_dtype_and_shape(dtype: str, shape: tuple[int, ...]) -> None:
    rng = np.random.default_rng(0)
    array = (rng.standard_normal(shape) * 1000).astype(dtype)
    header, decoded = envelope.decode(payload_for(array))
    assert header == header_for(array)
    assert decoded.dtype == np.dtype(dtype) and decoded.shape == shape
    np.testing.assert_array_equal(decoded, array)


def test_round_trip_keeps_every_header_field() -> None:
    array = np.arange(6, dtype=np.int64).reshape(1, 6)
    header = header_for(array, request="req-9", sampling=Sampling(temperature=0.7, top_k=40, top_p=0.9, seed=5),
                        hops=(HOP, dataclasses.replace(HOP, node="pi", first=5, last=9)), end=True)
    decoded, _ = envelope.decode(envelope.encode(header, array))
    assert decoded == header


def test_the_wire_bytes_are_little_endian_c_order_after_the_header() -> None:
    array = np.arange(6, dtype=np.int32).reshape(2, 3)
    data, body = split(payload_for(array))
    assert data["type"] == "act" and data["v"] == 1 and data["shape"] == [2, 3] and data["dtype"] == "int32"
    assert body == b"".join(struct.pack("<i", i) for i in range(6))


@pytest.mark.parametrize("variant", ["big-endian", "fortran", "strided"])
def test_encode_makes_any_layout_little_endian_c_order(variant: str) -> None:
    base = np.arange(24, dtype=np.float32).reshape(4, 6)
    array = {"big-endian": base.astype(">f4"), "fortran": np.asfortranarray(base),
             "strided": base[::2, ::3]}[variant]
    header, decoded = envelope.decode(envelope.encode(header_for(array), array))
    np.testing.assert_array_equal(decoded, array)
    assert decoded.dtype == np.dtype("<f4") and header.dtype == "float32"


def test_the_tensor_starts_aligned_after_a_padded_header() -> None:
    for session in ("a", "ab", "abc", "abcd" * 9):
        payload = payload_for(np.ones(3, np.float32), session=session)
        assert (len(payload) - 12) % envelope.BODY_ALIGN == 0
        assert envelope.decode(payload)[1].flags.aligned


def test_decode_of_a_header_without_padding_from_another_language() -> None:
    data, body = split(payload_for(np.arange(3, dtype=np.int64)))
    header, array = envelope.decode(reframe_raw(data, body))
    assert array.tolist() == [0, 1, 2] and header.start_pos == 17


# --- zero copy -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_decode_is_a_read_only_view_of_the_payload(kind: type) -> None:
    payload = kind(payload_for(np.arange(1024, dtype=np.float32)))
    _, array = envelope.decode(payload)
    assert np.shares_memory(array, np.frombuffer(payload, dtype=np.uint8))
    assert not array.flags.writeable
    with pytest.raises(ValueError):
        array[0] = 1.0


def test_forward_adds_a_hop_and_keeps_the_tensor_bytes() -> None:
    array = np.random.default_rng(1).standard_normal((1, 5, 8)).astype(np.float16)
    payload = payload_for(array, hops=(HOP,))
    second = dataclasses.replace(HOP, node="laptop", first=5, last=7)
    forwarded = envelope.forward(payload, second)
    header, decoded = envelope.decode(forwarded)
    assert header.hops == (HOP, second)
    assert split(forwarded)[1] == split(payload)[1]
    np.testing.assert_array_equal(decoded, array)


def test_forward_keeps_the_newest_hops_when_the_trace_is_full() -> None:
    hops = tuple(dataclasses.replace(HOP, first=i, last=i) for i in range(envelope.MAX_HOPS))
    forwarded = envelope.forward(payload_for(np.ones(2, np.int32), hops=hops), HOP)
    header, _ = envelope.decode(forwarded)
    assert len(header.hops) == envelope.MAX_HOPS and header.hops[0].first == 1 and header.hops[-1] == HOP


def test_forward_refuses_a_hop_that_is_not_a_hop() -> None:
    with pytest.raises(SchemaError, match="Hop"):
        envelope.forward(payload_for(np.ones(2, np.int32)), dataclasses.asdict(HOP))


def test_reframe_puts_a_new_header_on_the_same_body() -> None:
    array = np.arange(10, dtype=np.int64)
    header, body = envelope.decode_header(payload_for(array))
    moved = envelope.reframe(dataclasses.replace(header, piece=7, epoch=3), body)
    new_header, decoded = envelope.decode(moved)
    assert (new_header.piece, new_header.epoch) == (7, 3) and decoded.tolist() == list(range(10))
    with pytest.raises(SchemaError, match="shape"):
        envelope.reframe(header, body[:-8])


# --- the fast header path is the generic decoder, only faster -------------------------------


def test_the_fast_header_path_is_enabled_and_writes_the_generic_bytes() -> None:
    assert envelope._accept_header is not None, "a new ActHeader/Hop/Sampling field disabled the fast path"
    header = header_for(np.ones(1, np.float32), request="r", sampling=Sampling(top_k=3), hops=(HOP,))
    assert envelope._header_json(header) == header.to_json()
    assert envelope._accept_header(json.loads(header.to_json())) == header


# --- refusals: every one a SchemaError naming the field --------------------------------


def valid() -> tuple[dict, bytes]:
    return split(payload_for(np.arange(6, dtype=np.float32).reshape(2, 3)))


@pytest.mark.parametrize("change, field", [
    ({"dtype": "float64"}, "dtype"),
    ({"dtype": "bool"}, "dtype"),
    ({"shape": [2, 2]}, "shape"),
    ({"shape": [2, 4]}, "shape"),
    ({"shape": [6, -1]}, "shape[1]"),
    ({"shape": [1] * 9}, "shape"),
    ({"shape": ["2", 3]}, "shape[0]"),
    ({"shape": [-2, -3]}, "shape[0]"),
    ({"session": "has space"}, "session"),
    ({"request": ""}, "request"),
    ({"step": -1}, "step"),
    ({"epoch": True}, "epoch"),
    ({"piece": "1"}, "piece"),
    ({"start_pos": 1.5}, "start_pos"),
    ({"sampling": {"temperature": -1}}, "sampling.temperature"),
    ({"hops": [{"node": "n"}]}, "hops[0].first"),
    ({"hops": [dict(dataclasses.asdict(HOP), first=9, last=2)]}, "hops[0].first"),
    ({"hops": [dict(dataclasses.asdict(HOP), t_end=-1.0)]}, "hops[0].t_end"),
    ({"hops": [dataclasses.asdict(HOP)] * 65}, "hops"),
    ({"color": "red"}, "color"),
    ({"v": 2}, "v"),
    ({"type": "blob_chunk"}, "type"),
])
def test_a_bad_header_field_is_refused_by_name(change: dict, field: str) -> None:
    data, body = valid()
    refused(reframe_raw({**data, **change}, body), field)


def test_an_infinite_time_is_refused_by_name() -> None:
    data, body = valid()
    data["hops"] = [dataclasses.asdict(HOP)]
    payload = reframe_raw(data, body, edit=(b'"t_end": 10.02', b'"t_end": 1e999'))
    refused(payload, "hops[0].t_end", "finite")


@pytest.mark.parametrize("missing", ["session", "step", "epoch", "piece", "dtype", "shape", "start_pos", "v"])
def test_a_missing_header_field_is_refused_by_name(missing: str) -> None:
    data, body = valid()
    del data[missing]
    refused(reframe_raw(data, body), missing)


@pytest.mark.parametrize("cut", [1, 4, 23, 24])
def test_a_truncated_body_is_refused(cut: int) -> None:
    payload = payload_for(np.arange(6, dtype=np.float32))
    refused(payload[:-cut], "shape", "needs 24")


def test_trailing_bytes_are_refused() -> None:
    refused(payload_for(np.arange(6, dtype=np.float32)) + b"\0", "shape")


@pytest.mark.parametrize("payload, match", [
    (b"", "shorter than the 8-byte preamble"),
    (b"LMQ1\x10\x00", "shorter than the 8-byte preamble"),
    (b"LMQ1\x10\x00\x00\x00{}", "runs past the end"),
    (b"LMQB\x02\x00\x00\x00{}", "bad magic"),
    (b"LMQ1\x05\x00\x00\x00{\"a\":", "not valid JSON"),
    (b"LMQ1\x02\x00\x00\x00[]", "expected a JSON object"),
    (b"LMQ1\x04\x00\x00\x00\xff\xfe{}", "not UTF-8"),
])
def test_a_broken_frame_is_refused(payload: bytes, match: str) -> None:
    refused(payload, "", match)


def test_an_oversized_header_is_refused_before_it_is_parsed() -> None:
    size = frame.MAX_HEADER_BYTES + 1
    payload = b"LMQ1" + struct.pack("<I", size) + b" " * size
    refused(payload, "", "exceeds")
    refused(b"LMQ1\xff\xff\xff\xff", "", "exceeds")


@pytest.mark.parametrize("shape", [[1 << 30], [1 << 20, 1 << 20], [2**63 - 1] * 8, [0, 1 << 40]])
def test_a_declared_giant_is_refused_before_anything_is_allocated(shape: list[int]) -> None:
    data, _ = valid()
    error = refused(reframe_raw({**data, "shape": shape}, b""), "shape", "max_bytes")
    assert "268435456" in str(error)


def test_max_bytes_is_configurable_and_bounds_real_payloads_too() -> None:
    payload = payload_for(np.zeros(1024, np.float32))
    refused(payload, "shape", "max_bytes 1000", max_bytes=1000)
    assert envelope.decode(payload, max_bytes=4096)[1].shape == (1024,)


# --- the encoder refuses what no decoder would accept ----------------------------------


@pytest.mark.parametrize("array", [np.zeros(2, np.float64), np.zeros(2, bool), np.zeros(2, np.uint8)],
                         ids=["float64", "bool", "uint8"])
def test_encode_refuses_a_dtype_off_the_whitelist(array: np.ndarray) -> None:
    with pytest.raises(SchemaError, match="dtype"):
        header_for(array)


def test_encode_refuses_a_header_that_does_not_describe_the_array() -> None:
    array = np.zeros((2, 3), np.float32)
    with pytest.raises(SchemaError) as info:
        envelope.encode(header_for(array), array.reshape(3, 2))
    assert info.value.field == "shape"
    with pytest.raises(SchemaError) as info:
        envelope.encode(header_for(array), array.astype(np.float16))
    assert info.value.field == "dtype"
    with pytest.raises(SchemaError, match="max_bytes"):
        envelope.encode(header_for(array), array, max_bytes=8)


def test_a_header_refuses_bad_values_on_construction() -> None:
    with pytest.raises(SchemaError, match=r"shape\[0\]"):
        ActHeader(session="s", step=0, epoch=0, piece=0, dtype="int64", shape=(-1,), start_pos=0)
    with pytest.raises(SchemaError, match="first"):
        Hop(node="n", first=3, last=2, t_recv=0, t_start=0, t_end=0, t_send=0)
