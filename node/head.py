"""The head: a node role on the hub that turns requests into pipelined generation steps.

It takes GenerateRequest JSON on `requests` (``mosquitto_pub`` works), tokenizes,
keeps every session's token history, publishes each step's input on `act/0`, reads the
sampled token from `sessions/{s}/out`, streams TokenEvents on `responses/{id}` and ends
with a GenerateResult. Many sessions are in flight at once: while one waits for its
token, the stages work on others.

Because the head keeps the history, a session whose KV cache was lost (a new epoch, a
node that restarted) is re-prefilled from position 0: no request is lost to a replan.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np
import structlog

from linguamq import topics
from linguamq.node.textstream import TextStream, stop_reason
from linguamq.schemas import envelope
from linguamq.schemas.cluster import NodeStatus, Plan
from linguamq.schemas.envelope import ActHeader
from linguamq.schemas.errors import SchemaError
from linguamq.schemas.manifest import ModelManifest
from linguamq.schemas.requests import ErrorReport, GenerateRequest, GenerateResult, TokenEvent
from linguamq.schemas.wire import parse_json
from linguamq.topics.client import MqttClient

log = structlog.get_logger()
MAX_REPREFILLS = 3  # per session, after nodes lost its KV; then the request fails


@dataclasses.dataclass(frozen=True, kw_only=True)
class HeadSettings:
    name: str = "head"
    cluster: str = "home"
    max_sessions: int = 64  # in flight at once; more wait in the queue
    max_queued: int = 1024  # waiting requests; more are refused
    step_timeout_s: float = 60.0  # no token for this long: the request fails
    max_prompt_tokens: int = 4096


@dataclasses.dataclass
class _Session:
    request: GenerateRequest
    prompt: list[int]
    stream: TextStream | None = None
    tokens: list[int] = dataclasses.field(default_factory=list)
    epoch: int = 0
    step: int = 0
    t_start: float = 0.0
    t_first: float = 0.0
    t_last: float = 0.0  # last progress, for the step timeout
    reprefills: int = 0  # after a node lost the session's KV (evicted, expired, restarted)


class Head:
    def __init__(self, *, client: MqttClient, manifest: ModelManifest, encode: Callable[[str], list[int]],
                 decode: Callable[[list[int]], str], settings: HeadSettings = HeadSettings()) -> None:
        self._client, self._manifest, self.settings = client, manifest, settings
        self._encode, self._decode = encode, decode
        self._cluster = settings.cluster
        self._lock = threading.RLock()
        self._sessions: dict[str, _Session] = {}
        self._queue: deque[tuple[GenerateRequest, list[int]]] = deque()  # waiting: (request, prompt ids)
        self._plan: Plan | None = None
        self._status: dict[str, NodeStatus] = {}
        self._ready_epoch = 0  # the epoch whose stages all reported ready
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    def start(self) -> None:
        c, cl = self._client, self._cluster
        c.subscribe(topics.PLAN, topics.PLAN.build(cl), self._on_plan)
        c.subscribe(topics.NODE_STATUS, topics.NODE_STATUS.filter(cl), self._on_status)
        c.subscribe(topics.SESSION_OUT, topics.SESSION_OUT.filter(cl), self._on_out, on_reject=self._reject)
        c.subscribe(topics.ERRORS, topics.ERRORS.filter(cl), self._on_error)
        c.subscribe(topics.REQUESTS, topics.REQUESTS.build(cl), self._on_request, on_reject=self._reject_request)
        self._watchdog = threading.Thread(target=self._watch, name="head-watchdog", daemon=True)
        self._watchdog.start()

    def stop(self) -> None:
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=5)

    @property
    def ready(self) -> bool:
        """Every stage of the current plan has loaded its pieces."""
        return self._plan is not None and self._ready_epoch == self._plan.epoch

    # --- requests ------------------------------------------------------------------

    def _on_request(self, topic: str, request: GenerateRequest, retained: bool) -> None:
        with self._lock:
            if request.id in self._sessions or any(q.id == request.id for q, _ in self._queue):
                return self._fail(request, f"request id {request.id!r} is already in flight", code="bad_request")
            try:
                prompt = self._encode(request.prompt)
            except Exception as exc:  # a tokenizer may raise anything on odd input
                return self._fail(request, f"cannot tokenize the prompt: {exc}", code="bad_request")
            if not prompt or len(prompt) > self.settings.max_prompt_tokens:
                return self._fail(request, f"prompt has {len(prompt)} tokens; 1..{self.settings.max_prompt_tokens} "
                                  "accepted", code="too_large")
            if len(prompt) + request.max_tokens > self._manifest.max_context:
                return self._fail(request, f"prompt ({len(prompt)}) + max_tokens ({request.max_tokens}) exceeds the "
                                  f"model's context of {self._manifest.max_context}", code="too_large")
            if len(self._queue) >= self.settings.max_queued:
                return self._fail(request, "too many requests waiting", code="overloaded")
            self._queue.append((request, prompt))
            self._admit()

    def _admit(self) -> None:
        """Start queued requests while there is room and a ready pipeline."""
        while self.ready and self._queue and len(self._sessions) < self.settings.max_sessions:
            request, prompt = self._queue.popleft()
            session = _Session(request=request, prompt=prompt)
            session.stream = TextStream(self._decode, request.stop, lambda text, s=session: self._stream(s, text))
            self._sessions[request.id] = session
            session.t_start = time.perf_counter()
            self._prefill(session)

    def _prefill(self, session: _Session) -> None:
        """Send the whole history from position 0 under the ready epoch.

        At step k the session waits for token k+1; prompt + its k tokens are exactly the
        inputs that lead there, so a re-prefill at the same step yields the same token
        (sampling is seeded per step)."""
        session.epoch, session.t_last = self._ready_epoch, time.perf_counter()
        self._send(session, np.asarray([session.prompt + session.tokens], dtype=np.int64), start_pos=0)

    def _send(self, session: _Session, ids: np.ndarray, *, start_pos: int) -> None:
        request = session.request
        header = ActHeader.for_tensor(ids, session=request.id, request=request.id, step=session.step,
                                      epoch=session.epoch, piece=0, start_pos=start_pos, sampling=request.sampling)
        self._client.publish(topics.ACT, topics.ACT.build(self._cluster, piece=0), envelope.encode(header, ids))

    # --- tokens --------------------------------------------------------------------

    def _on_out(self, topic: str, value: tuple[ActHeader, np.ndarray], retained: bool) -> None:
        header, token_array = value
        with self._lock:
            session = self._sessions.get(header.session)
            if session is None or header.epoch != session.epoch or header.step != session.step:
                return  # finished, re-prefilled under a newer epoch, or a redelivered duplicate
            if token_array.shape != (1, 1) or token_array.dtype.kind not in "iu":
                return self._finish(session, "error", f"tail sent a {token_array.dtype} {token_array.shape} token")
            self._advance(session, int(token_array[0, 0]))

    def _advance(self, session: _Session, token: int) -> None:
        now = time.perf_counter()
        session.tokens.append(token)
        session.t_last = now
        if len(session.tokens) == 1:
            session.t_first = now
        reason = stop_reason(token, frozenset(self._manifest.eos_token_ids), session.stream, session.tokens,
                             session.request.max_tokens)
        if reason is not None:
            return self._finish(session, reason)
        session.step += 1
        start = len(session.prompt) + len(session.tokens) - 1
        self._send(session, np.asarray([[token]], dtype=np.int64), start_pos=start)

    def _stream(self, session: _Session, text: str) -> None:
        """Publish newly final text; long text (a held-back stop-string prefix) goes in pieces."""
        request = session.request.id
        name = topics.RESPONSES.build(self._cluster, request=request)
        for i in range(0, len(text), 1024):
            event = TokenEvent(request=request, index=len(session.tokens) - 1, token=session.tokens[-1],
                               text=text[i:i + 1024])
            self._client.publish(topics.RESPONSES, name, event)

    def _finish(self, session: _Session, reason: str, error: str | None = None) -> None:
        self._sessions.pop(session.request.id, None)
        text = session.stream.finish(session.tokens) if reason != "error" else ""
        n = len(session.tokens)
        result = GenerateResult(
            request=session.request.id, text=text, tokens=tuple(session.tokens), prompt_tokens=len(session.prompt),
            ttft_ms=(session.t_first - session.t_start) * 1e3 if n else 0.0,
            ms_per_token=(session.t_last - session.t_first) * 1e3 / (n - 1) if n > 1 else 0.0,
            stop_reason=reason, error=error)
        self._client.publish(topics.RESPONSES, topics.RESPONSES.build(self._cluster, request=session.request.id),
                             result)
        self._end_session(session)
        log.info("request done", request=session.request.id, tokens=n, reason=reason, error=error)
        self._admit()

    def _end_session(self, session: _Session) -> None:
        """Tell every stage to free the session's KV cache (an empty envelope marked end)."""
        empty = np.zeros((1, 0), dtype=np.int64)
        header = ActHeader.for_tensor(empty, session=session.request.id, request=session.request.id,
                                      step=session.step, epoch=session.epoch, piece=0, start_pos=0, end=True)
        self._client.publish(topics.ACT, topics.ACT.build(self._cluster, piece=0), envelope.encode(header, empty))

    # --- cluster state ---------------------------------------------------------------

    def _on_plan(self, topic: str, plan: Plan, retained: bool) -> None:
        with self._lock:
            self._plan = plan
            self._check_ready()

    def _on_status(self, topic: str, status: NodeStatus, retained: bool) -> None:
        with self._lock:
            self._status[status.node] = status
            self._check_ready()

    def _check_ready(self) -> None:
        plan = self._plan
        if plan is None or plan.epoch == self._ready_epoch or not plan.stages:
            return
        if all((s := self._status.get(stage.node)) is not None and s.state == "ready" and s.epoch == plan.epoch
               for stage in plan.stages):
            self._ready_epoch = plan.epoch
            log.info("pipeline ready", epoch=plan.epoch, stages=len(plan.stages))
            for session in list(self._sessions.values()):  # their KV is gone: re-prefill
                self._prefill(session)
            self._admit()

    def _on_error(self, topic: str, report: ErrorReport, retained: bool) -> None:
        with self._lock:
            session = self._sessions.get(report.ref or "")
            if session is None or report.reporter == self.settings.name:
                return
            if report.code == "stale_epoch":
                # A replan is under way: a node switched before the head, which re-prefills every
                # session once the new epoch is ready (the step watchdog ends one that never is).
                return
            if report.code == "unknown_session" and self._ready_epoch > session.epoch:
                return  # the re-prefill under the new epoch is already on its way
            if report.code == "unknown_session" and session.reprefills < MAX_REPREFILLS:
                session.reprefills += 1  # a node dropped its KV (bounds, expiry): rebuild it
                return self._prefill(session)
            self._finish(session, "error", f"{report.reporter}: {report.message}")

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            now = time.perf_counter()
            with self._lock:
                late = [s for s in self._sessions.values() if now - s.t_last > self.settings.step_timeout_s]
                for session in late:
                    self._finish(session, "error", f"no token for {self.settings.step_timeout_s:.0f} s")

    # --- rejects -----------------------------------------------------------------------

    def _fail(self, request: GenerateRequest, message: str, *, code: str) -> None:
        result = GenerateResult(request=request.id, text="", tokens=(), prompt_tokens=0, ttft_ms=0.0,
                                ms_per_token=0.0, stop_reason="error", error=message)
        self._client.publish(topics.RESPONSES, topics.RESPONSES.build(self._cluster, request=request.id), result)
        self._client.report_error(self._cluster, reporter=self.settings.name, to=request.client or self.settings.name,
                                  topic=topics.REQUESTS.build(self._cluster), code=code, message=message,
                                  ref=request.id)

    def _reject_request(self, topic: str, payload: bytes, exc: Exception) -> None:
        """A request that does not decode: an error report, and a final error response if it has an id."""
        request_id, client = _salvage_ids(payload)
        code = "too_large" if "exceeds" in str(exc) else "bad_payload"
        if request_id is not None:
            result = GenerateResult(request=request_id, text="", tokens=(), prompt_tokens=0, ttft_ms=0.0,
                                    ms_per_token=0.0, stop_reason="error", error=str(exc)[:1024])
            self._client.publish(topics.RESPONSES, topics.RESPONSES.build(self._cluster, request=request_id), result)
        self._client.report_error(self._cluster, reporter=self.settings.name, to=client or self.settings.name,
                                  topic=topic, code=code, message=str(exc), ref=request_id)

    def _reject(self, topic: str, payload: bytes, exc: Exception) -> None:
        self._client.report_error(self._cluster, reporter=self.settings.name, to=self.settings.name, topic=topic,
                                  code="bad_payload", message=str(exc))


_SALVAGE = {key: re.compile(rb'"%s"\s*:\s*"([A-Za-z0-9_-]{1,64})"' % key.encode()) for key in ("id", "client")}


def _salvage_ids(payload: bytes) -> tuple[str | None, str | None]:
    """The request and client ids of a rejected request, so its sender still gets a final
    answer: parsed if the JSON is readable, else looked for in its first 4 KiB (an
    oversized prompt usually comes after them)."""
    try:
        doc = parse_json(payload, max_bytes=GenerateRequest.MAX_BYTES)
    except SchemaError:
        doc = None
    if isinstance(doc, dict):
        return tuple(v if isinstance(v, str) and _valid_id(v) else None  # type: ignore[return-value]
                     for v in (doc.get("id"), doc.get("client")))
    head = bytes(payload[:4096])
    found = [m.group(1).decode() if (m := _SALVAGE[key].search(head)) else None for key in ("id", "client")]
    return found[0], found[1]


def _valid_id(value: str) -> bool:
    try:
        topics.validate_id("request", value)
    except topics.TopicError:
        return False
    return True
