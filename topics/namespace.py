"""The whole topic namespace under ``lmq/{cluster}/``: one template per topic.

Only this module builds or parses topic strings. Every ``Topic`` knows its template,
its payload, whether it is retained and its QoS, so publishers and subscribers cannot
disagree about them.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Literal

from linguamq.schemas.blobs import BlobRequest
from linguamq.schemas.cluster import Assignment, ClockPing, ClockPong, NodeControl, NodeStatus, Plan, Telemetry
from linguamq.schemas.manifest import ModelManifest
from linguamq.schemas.requests import CancelRequest, ErrorReport, GenerateRequest
from linguamq.schemas.wire import Message
from linguamq.topics.errors import TopicError

ROOT = "lmq"
MAX_TOPIC_LEN = 256
_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
_SHA = re.compile(r"[0-9a-f]{64}")
_PIECE = re.compile(r"0|[1-9][0-9]{0,5}")

# How each placeholder is validated; pieces are ints on the way in and out.
_PARAMS = {"cluster": _ID, "node": _ID, "session": _ID, "request": _ID, "client": _ID,
           "sha256": _SHA, "piece": _PIECE}

# Non-JSON payloads: "envelope" (schemas.envelope), "blob_chunk" (schemas.blobs),
# "responses" (TokenEvent, then a final GenerateResult), "bytes" (opaque).
Payload = type[Message] | Literal["envelope", "blob_chunk", "responses", "bytes"]


@dataclasses.dataclass(frozen=True)
class Topic:
    kind: str
    template: str  # relative to lmq/{cluster}/
    payload: Payload
    retain: bool = False
    qos: int = 0

    @property
    def params(self) -> tuple[str, ...]:
        return tuple(re.findall(r"\{(\w+)\}", self.template))

    def build(self, cluster: str, **params: str | int) -> str:
        """The concrete topic; every placeholder must be given and valid."""
        missing = set(self.params) - params.keys()
        extra = params.keys() - set(self.params)
        if missing or extra:
            raise TopicError(f"topic {self.kind!r} takes {list(self.params)}, got {sorted(params)}")
        return self._render(cluster, {k: _validate(k, v) for k, v in params.items()})

    def filter(self, cluster: str | None = None, **params: str | int) -> str:
        """A subscription filter: placeholders not given (and cluster None) become ``+``."""
        extra = params.keys() - set(self.params)
        if extra:
            raise TopicError(f"topic {self.kind!r} has no placeholder {sorted(extra)}")
        values = {k: _validate(k, params[k]) if k in params else "+" for k in self.params}
        return self._render(_validate("cluster", cluster) if cluster is not None else "+", values,
                            validate_cluster=False)

    def _render(self, cluster: str, values: dict[str, str], *, validate_cluster: bool = True) -> str:
        head = _validate("cluster", cluster) if validate_cluster else cluster
        topic = f"{ROOT}/{head}/" + self.template.format(**values)
        if len(topic) > MAX_TOPIC_LEN:
            raise TopicError(f"topic of {len(topic)} characters exceeds {MAX_TOPIC_LEN}")
        return topic


@dataclasses.dataclass(frozen=True)
class Parsed:
    """A topic taken apart: its kind, cluster and placeholder values (pieces as int)."""

    topic: Topic
    cluster: str
    params: dict[str, str | int]

    @property
    def kind(self) -> str:
        return self.topic.kind

    def __getitem__(self, name: str) -> str | int:
        return self.params[name]


MODEL = Topic("model", "model", ModelManifest, retain=True, qos=1)
PLAN = Topic("plan", "plan", Plan, retain=True, qos=1)
NODE_STATUS = Topic("node_status", "nodes/{node}/status", NodeStatus, retain=True, qos=1)
NODE_TELEMETRY = Topic("node_telemetry", "nodes/{node}/telemetry", Telemetry)
NODE_ASSIGN = Topic("node_assign", "nodes/{node}/assign", Assignment, retain=True, qos=1)
ACT = Topic("act", "act/{piece}", "envelope", qos=1)
SESSION_OUT = Topic("session_out", "sessions/{session}/out", "envelope", qos=1)
REQUESTS = Topic("requests", "requests", GenerateRequest, qos=1)
RESPONSES = Topic("responses", "responses/{request}", "responses", qos=1)
# Per-client request and response topics: with users and ACLs a client may publish only on
# its own request topic and read only its own responses (and errors), whatever it subscribes.
REQUESTS_FROM = Topic("requests_from", "requests/{client}", GenerateRequest, qos=1)
CLIENT_RESPONSES = Topic("client_responses", "responses/{client}/{request}", "responses", qos=1)
# Stopping a request: on `cancel` for one made on `requests`, on `cancel/{client}` for one made
# on `requests/{client}` (the ACLs let only that user publish there).
CANCEL = Topic("cancel", "cancel", CancelRequest, qos=1)
CANCEL_FROM = Topic("cancel_from", "cancel/{client}", CancelRequest, qos=1)
BLOB_REQUEST = Topic("blob_request", "blobs/{sha256}/request", BlobRequest, qos=1)
BLOB_CHUNK = Topic("blob_chunk", "blobs/{sha256}/chunks/{node}", "blob_chunk", qos=1)
ERRORS = Topic("errors", "errors/{client}", ErrorReport)
NODE_CONTROL = Topic("node_control", "nodes/{node}/control", NodeControl, qos=1)
NODE_PROBE = Topic("node_probe", "nodes/{node}/probe", "bytes")  # a node's link test, to itself
PING = Topic("ping", "nodes/{node}/ping", ClockPing)  # a tracer asks a node for its clock
PONG = Topic("pong", "clock/{client}", ClockPong)  # the node's answer, to the asker
# The hub's own counters (its head and planner: sessions, rejections), apart from the nodes'.
HUB_TELEMETRY = Topic("hub_telemetry", "hub/telemetry", Telemetry)

ALL: tuple[Topic, ...] = (MODEL, PLAN, NODE_STATUS, NODE_TELEMETRY, NODE_ASSIGN, NODE_CONTROL, NODE_PROBE, ACT, SESSION_OUT,
                          REQUESTS, RESPONSES, REQUESTS_FROM, CLIENT_RESPONSES, CANCEL, CANCEL_FROM, BLOB_REQUEST, BLOB_CHUNK,
                          ERRORS, PING, PONG, HUB_TELEMETRY)
_BY_DEPTH: dict[int, tuple[Topic, ...]] = {
    n: tuple(t for t in ALL if t.template.count("/") + 1 == n) for n in range(1, 5)}


def cluster_filter(cluster: str) -> str:
    """Everything of one cluster (for tracing)."""
    return f"{ROOT}/{_validate('cluster', cluster)}/#"


def parse(topic: str) -> Parsed:
    """Take a concrete topic apart; TopicError if it is not one of ours."""
    if not isinstance(topic, str) or len(topic) > MAX_TOPIC_LEN:
        raise TopicError("not a topic of ours: wrong type or too long")
    levels = topic.split("/")
    if len(levels) < 3 or levels[0] != ROOT:
        raise TopicError(f"{_short(topic)} is not under {ROOT}/{{cluster}}/")
    cluster = _validate("cluster", levels[1])
    rest = levels[2:]
    for candidate in _BY_DEPTH.get(len(rest), ()):
        params = _match(candidate.template.split("/"), rest)
        if params is not None:
            return Parsed(candidate, cluster, params)
    raise TopicError(f"{_short(topic)} is not a topic of ours")


def matches(filter_: str, topic: str) -> bool:
    """MQTT filter matching (``+`` one level, ``#`` the rest, ``$`` topics excluded)."""
    if topic.startswith("$") and not filter_.startswith("$"):
        return False
    f_levels, t_levels = filter_.split("/"), topic.split("/")
    for i, f in enumerate(f_levels):
        if f == "#":
            return True
        if i >= len(t_levels) or (f != "+" and f != t_levels[i]):
            return False
    return len(f_levels) == len(t_levels)


def validate_id(kind: str, value: str) -> str:
    """Check a cluster/node/session/request/client id; return it unchanged."""
    return _validate(kind, value)


def is_id(kind: str, value: str) -> bool:
    """``validate_id`` as a question: for ids taken from untrusted payloads."""
    try:
        _validate(kind, value)
    except TopicError:
        return False
    return True


def response_topic(cluster: str, request: str, client: str | None = None) -> str:
    """Where a request's TokenEvents and result go: `responses/{client}/{request}` for a request
    made on `requests/{client}` (a secured cluster's ACLs let only that user read it), else the
    open `responses/{request}`."""
    if client is None:
        return RESPONSES.build(cluster, request=request)
    return CLIENT_RESPONSES.build(cluster, client=client, request=request)


def _match(template: list[str], levels: list[str]) -> dict[str, str | int] | None:
    if len(template) != len(levels):
        return None
    params: dict[str, str | int] = {}
    for part, level in zip(template, levels):
        if part.startswith("{"):
            name = part[1:-1]
            if not _PARAMS[name].fullmatch(level):
                return None
            params[name] = int(level) if name == "piece" else level
        elif part != level:
            return None
    return params


def _validate(kind: str, value: str | int) -> str:
    if kind == "piece":
        if type(value) is not int or not 0 <= value < 1_000_000:
            raise TopicError(f"piece must be an integer in [0, 1000000), got {_short(value)}")
        return str(value)
    if not isinstance(value, str) or not _PARAMS[kind].fullmatch(value):
        what = "64 lowercase hex digits" if kind == "sha256" else "1-64 characters of A-Z a-z 0-9 _ -"
        raise TopicError(f"invalid {kind} {_short(value)}: must be {what} (no '+', '#', '/', NUL or empty)")
    return value


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
