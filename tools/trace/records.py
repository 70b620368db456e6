"""The record file (``--record FILE.jsonl``): one JSON event per line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from linguamq.schemas.cluster import Plan, Telemetry
from linguamq.schemas.envelope import ActHeader
from linguamq.schemas.errors import SchemaError
from linguamq.schemas.requests import ErrorReport, GenerateResult
from linguamq.schemas.wire import Message
from linguamq.tools.trace.model import TraceError, TraceModel

FORMAT = 1
_MESSAGES: dict[str, type[Message]] = {"input": ActHeader, "step": ActHeader, "telemetry": Telemetry,
                                       "plan": Plan, "error": ErrorReport, "result": GenerateResult}


# --- the record file -------------------------------------------------------------------


def encode_event(event: dict[str, Any]) -> str:
    doc = {k: (v.to_dict() if isinstance(v, Message) else v) for k, v in event.items()}
    return json.dumps(doc, separators=(",", ":"), allow_nan=False)


def decode_event(line: str) -> dict[str, Any]:
    try:
        event = json.loads(line)
        float(event["t"])
        if (kind := event["kind"]) in _MESSAGES:
            event["msg"] = _MESSAGES[kind].from_dict(event["msg"])
    except (ValueError, KeyError, TypeError, SchemaError) as exc:
        what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise TraceError(f"not a trace event: {what}") from exc
    return event


def read_events(path: Path) -> Iterator[dict[str, Any]]:
    with Path(path).open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield decode_event(line)
                except TraceError as exc:
                    raise TraceError(f"{path}:{n}: {exc}") from None


def load(path: Path, *, request: str | None = None) -> TraceModel:
    """A model of a recorded trace (``request``: keep only that request's steps)."""
    model = TraceModel(request=request, max_steps=10_000_000)
    sessions: set[str] = set()  # the request's session ids on the wire, as its steps are seen
    for event in read_events(path):
        if _wanted(event, request, sessions):
            model.apply(event)
    return model


def _wanted(event: dict[str, Any], request: str | None, sessions: set[str]) -> bool:
    if request is None:
        return True
    match event["kind"], event.get("msg"):
        case "input" | "step", ActHeader() as msg:
            if msg.request == request:
                sessions.add(msg.session)  # nodes' error reports name the session
            return msg.request == request or msg.session == request
        case "result", GenerateResult() as msg: return msg.request == request
        case "error", ErrorReport() as msg: return msg.ref in (None, request) or msg.ref in sessions
    return True
