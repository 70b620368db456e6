"""The live observer: follows a cluster over MQTT, feeds a TraceModel, writes the record."""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TextIO

import structlog

from linguamq import topics
from linguamq.schemas.cluster import ClockPing, ClockPong, Plan, Telemetry
from linguamq.schemas.envelope import ActHeader
from linguamq.schemas.requests import ErrorReport, GenerateResult, TokenEvent
from linguamq.schemas.wire import Message
from linguamq.tools.trace.clock import ClockEstimator, ClockSample
from linguamq.tools.trace.model import TraceModel
from linguamq.tools.trace.records import FORMAT, encode_event
from linguamq.topics.client import MqttClient, MqttError

log = structlog.get_logger()


# --- the live observer -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class TracerSettings:
    cluster: str = "home"
    request: str | None = None  # follow only this request
    record: Path | None = None  # JSONL file to write
    ping_interval_s: float = 2.0  # clock pings per node
    burst: int = 5  # pings sent at once to a node seen for the first time
    # follow responses/ for the head's GenerateResults; off by default: that topic also carries
    # every TokenEvent, a broker delivery per token for a figure the tracer measures itself
    results: bool = False
    append: bool = False  # add to an existing record instead of replacing it


class Tracer:
    """Observes a cluster over MQTT: feeds ``model`` and writes the record.

    Handlers (paho's thread) only stamp the arrival time and queue the event; one thread
    applies events to the model and writes them; another pings the nodes' clocks.
    """

    def __init__(self, *, url: str, settings: TracerSettings = TracerSettings(), model: TraceModel | None = None,
                 clock: Callable[[], float] = time.time, client_id: str | None = None,
                 login: Mapping[str, Any] | None = None) -> None:
        self.settings, self._clock = settings, clock
        self.model = model or TraceModel(request=settings.request)
        self.client_id = client_id or f"trace-{uuid.uuid4().hex[:10]}"
        # login: username/password/cafile (tools/args.connection_kwargs); a hub-role user
        self._client = MqttClient(url=url, client_id=self.client_id, **(login or {}))
        self._estimator = ClockEstimator()
        self._events: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._nodes: dict[str, int] = {}  # node -> pings still to send in its burst
        self._nodes_lock = threading.Lock()
        self._sessions: set[str] = set()  # session ids (on the wire) of the followed request
        self._seq = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._file: TextIO | None = None
        self.written = 0

    # --- lifecycle ----------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Tracer:
        s = self.settings
        if s.record is not None:
            Path(s.record).parent.mkdir(parents=True, exist_ok=True)
            self._file = Path(s.record).open("a" if s.append else "w", encoding="utf-8")
        self._put({"kind": "meta", "t": self._clock(), "format": FORMAT, "cluster": s.cluster,
                   "tracer": self.client_id, "request": s.request})
        self._subscribe()
        for target, name in ((self._drain, "trace-writer"), (self._ping_loop, "trace-ping")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        try:
            self._client.start(timeout)
        except MqttError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        self._stop.set()
        self._client.stop()
        self._events.put(None)
        for thread in self._threads:
            thread.join(timeout=5)
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> Tracer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- network thread ------------------------------------------------------------------

    def _subscribe(self) -> None:
        # QoS 0 on the per-token topics: an observer must cost the broker as little as it can
        c, cl, req = self._client, self.settings.cluster, self.settings.request
        c.subscribe(topics.ACT, topics.ACT.build(cl, piece=0), self._on_input, qos=0)
        # all of them: a session id is derived from (client, request id), not the request id
        c.subscribe(topics.SESSION_OUT, topics.SESSION_OUT.filter(cl), self._on_out, qos=0)
        c.subscribe(topics.NODE_TELEMETRY, topics.NODE_TELEMETRY.filter(cl), self._on_message("telemetry"))
        c.subscribe(topics.PLAN, topics.PLAN.build(cl), self._on_message("plan"))
        c.subscribe(topics.ERRORS, topics.ERRORS.filter(cl), self._on_message("error"))
        c.subscribe(topics.PONG, topics.PONG.build(cl, client=self.client_id), self._on_pong)
        if self.settings.results:
            responses = topics.RESPONSES.build(cl, request=req) if req else topics.RESPONSES.filter(cl)
            c.subscribe(topics.RESPONSES, responses, self._on_response, qos=0)

    def _on_input(self, topic: str, value: tuple[ActHeader, Any], retained: bool) -> None:
        t, header = self._clock(), value[0]
        if self._follows(header):
            self._put({"kind": "input", "t": t, "msg": header})

    def _on_out(self, topic: str, value: tuple[ActHeader, Any], retained: bool) -> None:
        t, (header, token) = self._clock(), value
        if self._follows(header):
            tok = int(token.reshape(-1)[0]) if token.size == 1 and token.dtype.kind in "iu" else None
            self._put({"kind": "step", "t": t, "msg": header, "token": tok})
            for hop in header.hops:
                self._know(hop.node)

    def _on_message(self, kind: str) -> Callable[[str, Message, bool], None]:
        def handle(topic: str, msg: Message, retained: bool) -> None:
            if isinstance(msg, ErrorReport) and self.settings.request and not self._follows_ref(msg.ref):
                return
            self._put({"kind": kind, "t": self._clock(), "msg": msg})
            if isinstance(msg, Telemetry):
                self._know(msg.node)
            elif isinstance(msg, Plan):
                for stage in msg.stages:
                    self._know(stage.node)
        return handle

    def _on_response(self, topic: str, msg: TokenEvent | GenerateResult, retained: bool) -> None:
        if isinstance(msg, GenerateResult):
            self._put({"kind": "result", "t": self._clock(), "msg": msg})

    def _on_pong(self, topic: str, pong: ClockPong, retained: bool) -> None:
        t3 = self._clock()
        estimate = self._estimator.add(pong.node, ClockSample(pong.t0, pong.t1, pong.t2, t3))
        if estimate is not None:
            self._put(estimate.to_event())

    def _follows(self, header: ActHeader) -> bool:
        req = self.settings.request
        if req is not None and header.request == req:
            self._sessions.add(header.session)  # nodes' error reports name the session
        return req is None or header.request == req or header.session == req

    def _follows_ref(self, ref: str | None) -> bool:
        """An error report about the followed request: its id, one of its sessions, or none."""
        return ref is None or ref == self.settings.request or ref in self._sessions

    def _know(self, node: str) -> None:
        with self._nodes_lock:
            if node not in self._nodes:
                self._nodes[node] = self.settings.burst

    def _put(self, event: dict[str, Any]) -> None:
        self._events.put(event)

    # --- threads ----------------------------------------------------------------------

    def _drain(self) -> None:
        while True:
            event = self._events.get()
            if event is None:
                break
            self.model.apply(event)
            if self._file is not None:
                self._file.write(encode_event(event) + "\n")
                self.written += 1
        if self._file is not None:
            self._file.flush()

    def _ping_loop(self) -> None:
        next_round = 0.0
        while not self._stop.wait(0.05):
            now = time.monotonic()
            with self._nodes_lock:
                burst = [n for n, left in self._nodes.items() if left > 0]
                for n in burst:
                    self._nodes[n] -= 1
                due = list(self._nodes) if now >= next_round else burst
            if now >= next_round:
                next_round = now + self.settings.ping_interval_s
            for node in due:
                self._ping(node)

    def _ping(self, node: str) -> None:
        self._seq += 1
        name = topics.PING.build(self.settings.cluster, node=node)
        try:
            self._client.publish(topics.PING, name, ClockPing(client=self.client_id, seq=self._seq, t0=self._clock()))
        except MqttError as exc:
            log.debug("clock ping not sent", node=node, error=str(exc))


@contextlib.contextmanager
def record_during(url: str, cluster: str, path: Path, *, request: str | None = None, append: bool = False,
                  results: bool = False, settle_s: float = 0.3) -> Iterator[Tracer]:
    """Record a trace of ``cluster`` to ``path`` (JSONL) while the block runs
    (``results``: also the head's GenerateResults, see ``TracerSettings``).

    Waits ``settle_s`` after connecting (retained plan, first clock pings) and as long
    after the block (the last outputs and pongs) before closing the file."""
    tracer = Tracer(url=url, settings=TracerSettings(cluster=cluster, record=Path(path), request=request,
                                                     append=append, results=results))
    tracer.start()
    try:
        time.sleep(settle_s)
        yield tracer
        time.sleep(settle_s)
    finally:
        tracer.stop()
