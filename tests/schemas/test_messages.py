"""Wire types: frozen, strict, versioned; every rejection names its field."""

from __future__ import annotations

import dataclasses
import json

import pytest

from linguamq.schemas import blobs
from linguamq.schemas.cluster import Assignment, NodeStatus, Plan, Segment, Telemetry
from linguamq.schemas.errors import SchemaError
from linguamq.schemas.examples import EXAMPLES
from linguamq.schemas.jsonschema import all_messages, path_for, render, schema_for
from linguamq.schemas.manifest import ModelManifest
from linguamq.schemas.requests import ErrorReport, GenerateRequest, GenerateResult, Sampling, TokenEvent

MESSAGES = sorted(EXAMPLES, key=lambda c: c.TYPE)


def _set(path: list, value):
    def mutate(doc: dict) -> None:
        target = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def _drop(key: str):
    return lambda doc: doc.pop(key)


# (class, mutation of its example's JSON, the field the error must name)
INVALID = [
    (GenerateRequest, _set(["max_tokens"], 0), "max_tokens"),
    (GenerateRequest, _set(["max_tokens"], True), "max_tokens"),
    (GenerateRequest, _set(["max_tokens"], 10**6), "max_tokens"),
    (GenerateRequest, _set(["max_tokens"], 2.5), "max_tokens"),
    (GenerateRequest, _set(["id"], "a/b"), "id"),
    (GenerateRequest, _set(["prompt"], 5), "prompt"),
    (GenerateRequest, _set(["sampling", "top_p"], 0), "sampling.top_p"),
    (GenerateRequest, _set(["sampling", "temperature"], -1), "sampling.temperature"),
    (GenerateRequest, _set(["sampling", "nope"], 1), "sampling.nope"),
    (GenerateRequest, _set(["stop"], "x"), "stop"),
    (GenerateRequest, _set(["stop"], [1]), "stop[0]"),
    (GenerateRequest, _set(["surprise"], 1), "surprise"),
    (GenerateRequest, _drop("prompt"), "prompt"),
    (GenerateRequest, _set(["prompt"], None), "prompt"),
    (GenerateRequest, _set(["messages"], [{"role": "user", "content": "Hi"}]), "prompt"),  # both
    (GenerateRequest, _set(["messages"], [{"role": "robot", "content": "Hi"}]), "messages[0].role"),
    (GenerateRequest, _set(["messages"], [{"role": "user"}]), "messages[0].content"),
    (NodeStatus, _set(["state"], "sleepy"), "state"),
    (NodeStatus, _set(["ts"], -1), "ts"),
    (NodeStatus, _drop("node"), "node"),
    (Telemetry, _set(["profile", "rtt_ms"], "fast"), "profile.rtt_ms"),
    (Telemetry, _set(["battery_pct"], 101), "battery_pct"),
    (Telemetry, _set(["pieces"], [{"piece": 1, "ms_ewma": 1.0}]), "pieces[0].runs"),
    (Assignment, _set(["segments"], [{"first": 5, "last": 2, "next_piece": None}]), "segments[0].last"),
    (Assignment, _set(["prefetch"], [-1]), "prefetch[0]"),
    (Plan, _set(["objective"], "fastest"), "objective"),
    (Plan, _set(["stages"], {"node": "a"}), "stages"),
    (ModelManifest, _set(["pieces", 1, "sha256"], "xyz"), "pieces[1].sha256"),
    (ModelManifest, _set(["pieces", 1, "index"], 5), "pieces[1].index"),
    (ModelManifest, _set(["pieces", 0, "inputs", 0, "dtype"], "bfloat16"), "pieces[0].inputs[0].dtype"),
    (ModelManifest, _set(["num_layers"], 3), "pieces"),
    (ModelManifest, _set(["bos_token_id"], -1), "bos_token_id"),
    (TokenEvent, _set(["token"], -3), "token"),
    (GenerateResult, _set(["stop_reason"], "bored"), "stop_reason"),
    (ErrorReport, _set(["code"], "oops"), "code"),
    (blobs.BlobRequest, _set(["length"], 0), "length"),
]


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda c: c.TYPE)
def test_examples_round_trip(cls) -> None:
    msg = EXAMPLES[cls]
    wire = msg.to_json()
    assert cls.from_json(wire) == msg
    doc = json.loads(wire)
    assert (doc["type"], doc["v"]) == (cls.TYPE, cls.VERSION)


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda c: c.TYPE)
def test_messages_are_frozen(cls) -> None:
    msg = EXAMPLES[cls]
    name = dataclasses.fields(msg)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(msg, name, getattr(msg, name))


@pytest.mark.parametrize(("cls", "mutate", "field"), INVALID, ids=[f"{c.TYPE}-{f}" for c, _, f in INVALID])
def test_invalid_payloads_name_the_field(cls, mutate, field) -> None:
    doc = json.loads(EXAMPLES[cls].to_json())
    mutate(doc)
    with pytest.raises(SchemaError) as err:
        cls.from_json(json.dumps(doc))
    assert err.value.field == field
    assert str(err.value).startswith(field)


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda c: c.TYPE)
def test_wrong_type_tag_and_version_are_rejected(cls) -> None:
    doc = json.loads(EXAMPLES[cls].to_json())
    for key, value in (("type", "something_else"), ("v", cls.VERSION + 1), ("v", "1")):
        bad = {**doc, key: value}
        with pytest.raises(SchemaError, match="version|expected") as err:
            cls.from_json(json.dumps(bad))
        assert err.value.field == key


def test_a_message_of_another_type_is_rejected() -> None:
    with pytest.raises(SchemaError, match="expected 'plan'"):
        Plan.from_json(EXAMPLES[NodeStatus].to_json())


def test_construction_is_checked_like_decoding() -> None:
    with pytest.raises(SchemaError, match="max_tokens"):
        GenerateRequest(id="r1", prompt="hi", max_tokens=0)
    with pytest.raises(SchemaError, match="node"):
        NodeStatus(node="no/slash", state="online", ts=1.0)
    with pytest.raises(SchemaError, match="last"):
        Segment(first=4, last=2, next_piece=None)


def test_a_mosquitto_pub_request_needs_no_type_or_version() -> None:
    req = GenerateRequest.from_json(b'{"id":"r1","prompt":"Hello","max_tokens":16}')
    assert (req.id, req.prompt, req.max_tokens, req.sampling) == ("r1", "Hello", 16, Sampling())
    assert GenerateRequest.from_json(b'{"id":"r1","prompt":"Hello","max_tokens":16.0}').max_tokens == 16


@pytest.mark.parametrize("payload", [
    b"", b"{", b"[]", b"null", b"42", b"\xff\xfe", b"[" * 50_000, b'{"id": NaN}',
    b'{"id":"r1","prompt":"x","max_tokens":1e400}', b'{"id":"r1","prompt":"x","max_tokens":99999999999999999999999}',
])
def test_garbage_is_a_schema_error(payload: bytes) -> None:
    with pytest.raises(SchemaError):
        GenerateRequest.from_json(payload)


def test_oversized_payload_is_rejected_before_parsing() -> None:
    big = b'{"id":"r1","prompt":"' + b"x" * GenerateRequest.MAX_BYTES + b'"}'
    with pytest.raises(SchemaError, match="exceeds"):
        GenerateRequest.from_json(big)


def test_blob_chunks_round_trip_and_are_hash_checked() -> None:
    data = bytes(range(256)) * 10
    sha = "cd" * 32
    payload = blobs.encode_chunk(sha, 100, 10_000, data)
    header, body = blobs.decode_chunk(payload)
    assert (header.sha256, header.offset, header.total, bytes(body)) == (sha, 100, 10_000, data)
    corrupted = bytearray(payload)
    corrupted[-1] ^= 0xFF
    with pytest.raises(SchemaError, match="chunk_sha256"):
        blobs.decode_chunk(bytes(corrupted))
    with pytest.raises(SchemaError, match="runs past"):
        blobs.decode_chunk(blobs.encode_chunk(sha, 9_000, 10_000, data))


# --- JSON Schema files: in sync with the classes, and they agree on every example ---------

def test_a_chat_request_is_accepted_by_both(validators) -> None:
    doc = {"id": "r1", "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}
    request = GenerateRequest.from_dict(doc)
    assert (request.prompt, [m.role for m in request.messages]) == (None, ["system", "user"])
    validators[GenerateRequest].validate(json.loads(request.to_json()))
    validators[GenerateRequest].validate(doc)


def test_every_message_has_an_example_and_a_committed_schema_file() -> None:
    assert {c.TYPE for c in all_messages()} - {"act"} == {c.TYPE for c in EXAMPLES}
    for cls in all_messages():
        assert path_for(cls).read_text() == render(cls), f"run `make schemas`: {path_for(cls).name} is stale"


@pytest.fixture(scope="module")
def validators():
    import jsonschema
    return {cls: jsonschema.Draft202012Validator(schema_for(cls)) for cls in EXAMPLES}


@pytest.mark.parametrize("cls", MESSAGES, ids=lambda c: c.TYPE)
def test_valid_examples_validate_against_the_json_schema(cls, validators) -> None:
    validators[cls].validate(json.loads(EXAMPLES[cls].to_json()))


@pytest.mark.parametrize(("cls", "mutate", "field"), INVALID, ids=[f"{c.TYPE}-{f}" for c, _, f in INVALID])
def test_invalid_examples_are_rejected_by_both(cls, mutate, field, validators) -> None:
    doc = json.loads(EXAMPLES[cls].to_json())
    mutate(doc)
    with pytest.raises(SchemaError):
        cls.from_dict(doc)
    # Cross-field rules (index order, layer count, first <= last) are beyond JSON Schema.
    if field not in ("pieces", "pieces[1].index", "segments[0].last"):
        assert not validators[cls].is_valid(doc)
