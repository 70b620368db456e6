"""`linguamq trace`: follow requests across the pipeline, on one clock.

Three parts, each usable alone:

- ``ClockEstimator`` / ``Aligner``: NTP-style clock offsets of the nodes relative to the
  tracer (``offset = node clock - tracer clock``), from ClockPing/ClockPong exchanges;
  per node the sample with the least round trip among the last ``window`` is kept.
- ``TraceModel``: events in, figures out (per step and hop, per node, per epoch). The
  same model serves the live view and a replay of a recorded file.
- ``Tracer``: an MQTT observer that feeds a model and, optionally, a JSONL record.

The observer stands in for the head: it subscribes to `act/0` (the head's step inputs)
and `sessions/+/out` (the tail's outputs) as the head does, so "seen by the tracer" is
"seen by the head" up to one broker fan-out. All times below are the tracer's wall
clock; node timestamps are moved onto it by their estimated offset.

Accounting of one decode step k of a session (``StepTiming``): a token goes round the
ring head -> n1 -> ... -> tail -> head, and every part of that round has a figure:
    head_ms       = t_in(k) - t_out(k-1): the head's turnaround, from token k-1 arriving
                    to the input of step k leaving (its work plus a broker fan-out)
    head->first   = first hop's t_recv - t_in(k)              (transfer head -> first node)
    per hop i     = queue (t_start - t_recv) + compute (t_end - t_start)
                    + send (t_send - t_end: the output's encoding, ~0)
    transfer i    = hop i+1's t_recv - hop i's t_send          (tail: t_out(k) - t_send)
    pipeline_ms   = head->first + sum over hops (queue + compute + send + transfer)
    cycle_ms      = head_ms + pipeline_ms   (= t_out(k) - t_out(k-1))
"The measured ms/token" is the head's own figure, GenerateResult.ms_per_token, taken on
the head's clock: (T(n-1) - T(0)) / (n-1), T(k) being step k's output arriving at the
head, i.e. the mean of T(k) - T(k-1) over the decode steps k = 1..n-1. The mean of
``cycle_ms`` over the same steps, summed from the per-hop figures, must match it within
10% (tests assert it on a recorded 3-node generation). Offsets cancel in the sums but
not in the parts: a wrong offset shows as a negative transfer on one side of a node and
an inflated one on the other (tests inject a 7.5 s skew and check every part). The
tracer's own receive times stand in for the head's: a busy tracer sees act/0 late, which
moves time from head_ms to head->first (seen as a negative head->first of a few ms).

Record format (``--record FILE.jsonl``): one JSON object per line, ``{"kind": ..., "t":
tracer wall clock, ...}`` with kind ``meta``, ``clock`` (node, offset_s, rtt_s, samples),
``input`` / ``step`` (``msg``: the envelope header; ``step`` adds ``token``),
``telemetry``, ``plan``, ``error``, ``result`` (``msg``: the message as on the wire).
"""

from __future__ import annotations

import bisect
import contextlib
import dataclasses
import json
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO

import structlog

from linguamq import topics
from linguamq.schemas.cluster import ClockPing, ClockPong, Plan, Telemetry
from linguamq.schemas.envelope import ActHeader, Hop
from linguamq.schemas.errors import SchemaError
from linguamq.schemas.requests import ErrorReport, GenerateResult, TokenEvent
from linguamq.schemas.wire import Message
from linguamq.topics.client import MqttClient, MqttError

log = structlog.get_logger()
FORMAT = 1
_MESSAGES: dict[str, type[Message]] = {"input": ActHeader, "step": ActHeader, "telemetry": Telemetry,
                                       "plan": Plan, "error": ErrorReport, "result": GenerateResult}


class TraceError(RuntimeError):
    """A trace file that cannot be read, or an export that cannot be made."""


# --- clocks ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClockSample:
    """One ping: t0 (tracer sent), t1 (node received), t2 (node answered), t3 (tracer received)."""

    t0: float
    t1: float
    t2: float
    t3: float

    @property
    def offset(self) -> float:
        return ((self.t1 - self.t0) + (self.t2 - self.t3)) / 2

    @property
    def rtt(self) -> float:
        return (self.t3 - self.t0) - (self.t2 - self.t1)


@dataclasses.dataclass(frozen=True)
class ClockEstimate:
    node: str
    t: float  # tracer clock when the estimate was made
    offset_s: float  # node clock minus tracer clock
    rtt_s: float
    samples: int

    def to_event(self) -> dict[str, Any]:
        return {"kind": "clock", **dataclasses.asdict(self)}


class ClockEstimator:
    """Per node, the offset of the least-round-trip sample among the last ``window``."""

    def __init__(self, window: int = 32) -> None:
        self._window = window
        self._samples: dict[str, deque[ClockSample]] = {}
        self._count: dict[str, int] = {}

    def add(self, node: str, sample: ClockSample) -> ClockEstimate | None:
        """The node's estimate after ``sample``; None if the sample is impossible (rtt < 0)."""
        if sample.rtt < 0:
            return None
        window = self._samples.setdefault(node, deque(maxlen=self._window))
        window.append(sample)
        self._count[node] = self._count.get(node, 0) + 1
        best = min(window, key=lambda s: s.rtt)
        return ClockEstimate(node=node, t=sample.t3, offset_s=best.offset, rtt_s=best.rtt, samples=self._count[node])


class Aligner:
    """Moves node timestamps onto the tracer's clock with the estimate in effect then."""

    def __init__(self) -> None:
        self._times: dict[str, list[float]] = {}
        self._estimates: dict[str, list[ClockEstimate]] = {}
        self._lock = threading.Lock()  # the live view reads while the tracer adds

    def add(self, estimate: ClockEstimate) -> None:
        with self._lock:
            times = self._times.setdefault(estimate.node, [])
            i = bisect.bisect_right(times, estimate.t)
            times.insert(i, estimate.t)
            self._estimates.setdefault(estimate.node, []).insert(i, estimate)

    def estimate(self, node: str, t: float | None = None) -> ClockEstimate | None:
        """The latest estimate at or before ``t`` (the first one if none is; the last if t is None)."""
        with self._lock:
            estimates = self._estimates.get(node)
            if not estimates:
                return None
            if t is None:
                return estimates[-1]
            return estimates[max(0, bisect.bisect_right(self._times[node], t) - 1)]

    def offset(self, node: str, t: float | None = None) -> float:
        est = self.estimate(node, t)
        return est.offset_s if est is not None else 0.0

    def to_tracer(self, node: str, t_node: float) -> float:
        return t_node - self.offset(node, t_node)


# --- the model ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class StepTrace:
    """One generation step of one session as observed (times: tracer clock, hops: node clocks)."""

    session: str
    request: str | None
    step: int
    epoch: int
    start_pos: int
    tokens_in: int  # input tokens of the step (the prompt at step 0)
    t_in: float | None  # the step's input seen on act/0
    t_out: float  # the tail's output seen on sessions/{s}/out
    t_prev_out: float | None  # the previous step's output of this session (same epoch)
    hops: tuple[Hop, ...]
    token: int | None


@dataclasses.dataclass(frozen=True)
class HopTiming:
    node: str
    first: int
    last: int
    t_recv: float  # tracer clock
    t_start: float
    t_end: float
    t_send: float
    queue_ms: float
    compute_ms: float
    send_ms: float
    transfer_ms: float | None  # to the next hop, or to the head for the tail


@dataclasses.dataclass(frozen=True)
class StepTiming:
    trace: StepTrace
    hops: tuple[HopTiming, ...]
    head_to_first_ms: float | None
    head_ms: float | None  # the head's turnaround before this step

    @property
    def pipeline_ms(self) -> float:
        """head->first + every hop's queue, compute, send and transfer (= t_out - t_in)."""
        return (self.head_to_first_ms or 0.0) + sum(
            h.queue_ms + h.compute_ms + h.send_ms + (h.transfer_ms or 0.0) for h in self.hops)

    @property
    def cycle_ms(self) -> float | None:
        """head turnaround + pipeline: the time between this token and the previous one."""
        return None if self.head_ms is None or self.head_to_first_ms is None else self.head_ms + self.pipeline_ms

    @property
    def tail_to_head_ms(self) -> float | None:
        return self.hops[-1].transfer_ms if self.hops else None

    def describe(self) -> str:
        """One line: session, step, head turnaround, head->n1, each hop and transfer, in ms."""
        t = self.trace
        parts = [f"{t.session[:12]:<12} s{t.step:<4} e{t.epoch}"]
        if self.head_ms is not None:
            parts.append(f"head {self.head_ms:4.1f}")
        if self.head_to_first_ms is not None:
            parts.append(f"head>{self.head_to_first_ms:5.1f}")
        for h in self.hops:
            parts.append(f"{h.node}[{h.first}-{h.last}] q{h.queue_ms:.1f} c{h.compute_ms:.1f}")
            if h.transfer_ms is not None:
                parts.append(f">{h.transfer_ms:.1f}")
        total = f" = {self.cycle_ms:6.1f} ms" if self.cycle_ms is not None else \
            f" = {self.pipeline_ms:6.1f} ms (from input)" if t.t_in is not None else ""
        return " | ".join(parts) + total


@dataclasses.dataclass(frozen=True)
class NodeStats:
    node: str
    pieces: str
    busy_pct: float
    ms_per_step: float | None
    msgs_per_s: float
    errors: int
    queue_depth: int | None
    rejected: int | None
    ewma_ms: float | None
    offset_ms: float | None
    rtt_ms: float | None


class TraceModel:
    """Events in (``apply``), figures out. Thread-safe: the live view reads while it fills."""

    def __init__(self, *, request: str | None = None, max_steps: int = 200_000, window_s: float = 10.0) -> None:
        self.request, self.window_s = request, window_s
        self.aligner = Aligner()
        self.meta: dict[str, Any] = {}
        self.steps: deque[StepTrace] = deque(maxlen=max_steps)
        self.plans: list[tuple[float, Plan]] = []
        self.telemetry: dict[str, tuple[float, Telemetry]] = {}
        self.errors: deque[tuple[float, ErrorReport]] = deque(maxlen=10_000)
        self.results: dict[str, tuple[float, GenerateResult]] = {}
        self.first_t: float | None = None
        self.last_t: float | None = None
        self.step_count = 0  # steps ever applied (``steps`` keeps the latest ``max_steps``)
        self.error_count = 0
        self._inputs: dict[tuple[str, int, int], tuple[float, ActHeader]] = {}
        self._last_out: dict[str, tuple[int, int, float]] = {}  # session -> (epoch, step, t_out)
        self._lock = threading.Lock()

    # --- events in -----------------------------------------------------------------------

    def apply(self, event: dict[str, Any]) -> None:
        with self._lock:
            t = float(event["t"])
            self.first_t = t if self.first_t is None else min(self.first_t, t)
            self.last_t = t if self.last_t is None else max(self.last_t, t)
            match event["kind"]:
                case "meta": self.meta.update({k: v for k, v in event.items() if k not in ("kind", "t")})
                case "clock": self.aligner.add(ClockEstimate(**{k: event[k] for k in (
                    "node", "t", "offset_s", "rtt_s", "samples")}))
                case "input": self._on_input(t, event["msg"])
                case "step": self._on_step(t, event["msg"], event.get("token"))
                case "telemetry": self.telemetry[event["msg"].node] = (t, event["msg"])
                case "plan": self.plans.append((t, event["msg"]))
                case "error": self._on_error(t, event["msg"])
                case "result": self.results[event["msg"].request] = (t, event["msg"])

    def _on_error(self, t: float, report: ErrorReport) -> None:
        self.errors.append((t, report))
        self.error_count += 1

    def _on_input(self, t: float, header: ActHeader) -> None:
        if header.end:
            return
        self._inputs[(header.session, header.step, header.epoch)] = (t, header)
        if len(self._inputs) > 10_000:  # inputs whose output never came
            for key in list(self._inputs)[:5_000]:
                del self._inputs[key]

    def _on_step(self, t: float, header: ActHeader, token: int | None) -> None:
        seen = self._inputs.pop((header.session, header.step, header.epoch), None)
        t_in, sent = seen if seen is not None else (None, None)
        prev = self._last_out.get(header.session)
        t_prev = prev[2] if prev is not None and prev[0] == header.epoch and prev[1] == header.step - 1 else None
        self._last_out[header.session] = (header.epoch, header.step, t)
        self.step_count += 1
        tokens_in = sent.shape[-1] if sent is not None and sent.shape else 0
        self.steps.append(StepTrace(
            session=header.session, request=header.request, step=header.step, epoch=header.epoch,
            start_pos=sent.start_pos if sent is not None else header.start_pos, tokens_in=tokens_in,
            t_in=t_in, t_out=t, t_prev_out=t_prev, hops=header.hops, token=token))

    # --- figures out --------------------------------------------------------------------

    def timing(self, step: StepTrace) -> StepTiming:
        """The step's figures with every node timestamp on the tracer's clock."""
        al = self.aligner
        aligned = [(h, *(al.to_tracer(h.node, x) for x in (h.t_recv, h.t_start, h.t_end, h.t_send)))
                   for h in step.hops]
        hops = []
        for i, (h, recv, start, end, send) in enumerate(aligned):
            nxt = aligned[i + 1][1] if i + 1 < len(aligned) else step.t_out
            hops.append(HopTiming(node=h.node, first=h.first, last=h.last, t_recv=recv, t_start=start, t_end=end,
                                  t_send=send, queue_ms=(start - recv) * 1e3, compute_ms=(end - start) * 1e3,
                                  send_ms=(send - end) * 1e3, transfer_ms=(nxt - send) * 1e3))
        head_to_first = (aligned[0][1] - step.t_in) * 1e3 if aligned and step.t_in is not None else None
        head_ms = (step.t_in - step.t_prev_out) * 1e3 if step.t_in is not None and step.t_prev_out is not None \
            else None
        return StepTiming(trace=step, hops=tuple(hops), head_to_first_ms=head_to_first, head_ms=head_ms)

    def snapshot(self) -> list[StepTrace]:
        with self._lock:
            return list(self.steps)

    def timings(self, *, session: str | None = None, last: int | None = None) -> list[StepTiming]:
        steps = [s for s in self.snapshot() if session is None or s.session == session]
        return [self.timing(s) for s in (steps[-last:] if last else steps)]

    def nodes(self) -> list[str]:
        """Nodes of the latest plan in stage order, then any other node seen."""
        with self._lock:
            order = [s.node for s in self.plans[-1][1].stages] if self.plans else []
            seen = [h.node for s in list(self.steps)[-200:] for h in s.hops] + list(self.telemetry)
        return list(dict.fromkeys([*order, *sorted(set(seen) - set(order))]))

    def node_stats(self, now: float | None = None) -> list[NodeStats]:
        """Per node over the last ``window_s`` seconds (of the tracer clock) up to ``now``."""
        now = self.last_t if now is None else now
        if now is None:
            return []
        since = max(now - self.window_s, self.first_t or now)
        span = max(now - since, 1e-3)
        recent = []
        for s in reversed(self.snapshot()):
            if s.t_out < since:
                break
            recent.append(self.timing(s))
        with self._lock:
            errors = [e for t, e in self.errors if t >= since]
            telemetry = dict(self.telemetry)
            plan = self.plans[-1][1] if self.plans else None
        return [self._node_stats(node, recent, errors, telemetry.get(node), plan, span) for node in self.nodes()]

    def _node_stats(self, node: str, recent: list[StepTiming], errors: list[ErrorReport],
                    tele: tuple[float, Telemetry] | None, plan: Plan | None, span: float) -> NodeStats:
        hops = [h for st in recent for h in st.hops if h.node == node]
        compute = [h.compute_ms for h in hops]
        stages = [f"{s.first}-{s.last}" for s in plan.stages if s.node == node] if plan else []
        est = self.aligner.estimate(node)
        t = tele[1] if tele else None
        return NodeStats(
            node=node, pieces=",".join(stages) or "-", busy_pct=min(100.0, sum(compute) / (span * 1e3) * 100),
            ms_per_step=sum(compute) / len(compute) if compute else None, msgs_per_s=len(hops) / span,
            errors=sum(1 for e in errors if e.reporter == node), queue_depth=t.queue_depth if t else None,
            rejected=t.rejected if t else None,
            ewma_ms=sum(p.ms_ewma for p in t.pieces) if t and t.pieces else None,
            offset_ms=est.offset_s * 1e3 if est else None, rtt_ms=est.rtt_s * 1e3 if est else None)

    def epochs(self) -> list[str]:
        """One line per plan message: epoch, stages, predicted ms/token, reason."""
        with self._lock:
            plans = list(self.plans)
        return [f"epoch {p.epoch}: " + " ".join(f"{s.node}:{s.first}-{s.last}" for s in p.stages)
                + f" (predicted {p.predicted_ms_per_token:.1f} ms/token{'; ' + p.reason if p.reason else ''})"
                for _, p in plans]


def accounting(model: TraceModel, request: str) -> dict[str, float]:
    """For one request: the mean per-hop figures of its decode steps against its ms/token.

    Over the decode steps k >= 1 that follow their predecessor in the same epoch:
    ``pipeline_ms`` (head->first + hops + transfers), ``head_ms`` (the head's turnaround),
    ``cycle_ms`` (their sum, the figures' account of one token); ``observed_ms_per_token``:
    mean t_out(k) - t_out(k-1) at the tracer; ``head_ms_per_token``: the head's own figure
    (its GenerateResult), when recorded.
    """
    steps = [model.timing(s) for s in model.snapshot()
             if s.request == request and s.step >= 1 and s.t_in is not None and s.t_prev_out is not None]
    if not steps:
        raise TraceError(f"no complete decode step of request {request} in the trace")
    n = len(steps)
    out = {"steps": float(n), "pipeline_ms": sum(s.pipeline_ms for s in steps) / n,
           "head_ms": sum(s.head_ms or 0.0 for s in steps) / n,
           "cycle_ms": sum(s.cycle_ms or 0.0 for s in steps) / n,
           "observed_ms_per_token": sum((s.trace.t_out - s.trace.t_prev_out) * 1e3 for s in steps) / n}
    if request in model.results:
        out["head_ms_per_token"] = model.results[request][1].ms_per_token
    return out


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
    for event in read_events(path):
        if _wanted(event, request):
            model.apply(event)
    return model


def _wanted(event: dict[str, Any], request: str | None) -> bool:
    if request is None:
        return True
    msg = event.get("msg")
    match event["kind"]:
        case "input" | "step": return msg.request == request or msg.session == request
        case "result": return msg.request == request
        case "error": return msg.ref in (None, request)
    return True


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
                 login: dict[str, Any] | None = None) -> None:
        self.settings, self._clock = settings, clock
        self.model = model or TraceModel(request=settings.request)
        self.client_id = client_id or f"trace-{uuid.uuid4().hex[:10]}"
        # login: username/password/cafile (tools/args.connection_kwargs); a hub-role user
        self._client = MqttClient(url=url, client_id=self.client_id, **(login or {}))
        self._estimator = ClockEstimator()
        self._events: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._nodes: dict[str, int] = {}  # node -> pings still to send in its burst
        self._nodes_lock = threading.Lock()
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
        out = topics.SESSION_OUT.build(cl, session=req) if req else topics.SESSION_OUT.filter(cl)
        c.subscribe(topics.SESSION_OUT, out, self._on_out, qos=0)
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
            if kind == "error" and self.settings.request and msg.ref not in (None, self.settings.request):
                return
            self._put({"kind": kind, "t": self._clock(), "msg": msg})
            if kind == "telemetry":
                self._know(msg.node)
            elif kind == "plan":
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
        return req is None or header.request == req or header.session == req

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


def replay(events: Iterable[dict[str, Any]], model: TraceModel | None = None) -> TraceModel:
    model = model or TraceModel()
    for event in events:
        model.apply(event)
    return model
