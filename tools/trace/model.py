"""The trace model: events in, figures out (per step and hop, per node, per epoch);
the accounting of a request's ms/token."""

from __future__ import annotations

import dataclasses
import threading
from collections import deque
from collections.abc import Iterable
from typing import Any

from linguamq.schemas.cluster import Plan, Telemetry
from linguamq.schemas.envelope import ActHeader, Hop
from linguamq.schemas.requests import ErrorReport, GenerateResult
from linguamq.tools.trace.clock import Aligner, ClockEstimate


class TraceError(RuntimeError):
    """A trace file that cannot be read, or an export that cannot be made."""


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
    # The ring: the step's input came from the tail (ActHeader.ring > 0, the chain of the
    # previous step), which sends it before its token: t_in is the tail's, not the head's.
    ring: bool = False


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
        sender = "tail" if t.ring else "head"  # the ring: the tail's lead (negative), tail -> first node
        if self.head_ms is not None:
            parts.append(f"{sender} {self.head_ms:4.1f}")
        if self.head_to_first_ms is not None:
            parts.append(f"{sender}>{self.head_to_first_ms:5.1f}")
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
        self._last_out: dict[str, tuple[int, int, float, int]] = {}  # session -> (epoch, step, t_out, chain)
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
        ring = sent is not None and sent.ring > 0 and t_prev is not None and prev is not None and prev[3] == sent.chain
        self._last_out[header.session] = (header.epoch, header.step, t, header.chain)
        self.step_count += 1
        tokens_in = sent.shape[-1] if sent is not None and sent.shape else 0
        self.steps.append(StepTrace(
            session=header.session, request=header.request, step=header.step, epoch=header.epoch,
            start_pos=sent.start_pos if sent is not None else header.start_pos, tokens_in=tokens_in,
            t_in=t_in, t_out=t, t_prev_out=t_prev, hops=header.hops, token=token, ring=ring))

    # --- figures out --------------------------------------------------------------------

    def timing(self, step: StepTrace) -> StepTiming:
        """The step's figures with every node timestamp on the tracer's clock."""
        aligned = [self._aligned(h) for h in step.hops]
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

    def _aligned(self, hop: Hop) -> tuple[Hop, float, float, float, float]:
        """The hop with its receive, start, end and send times on the tracer's clock."""
        recv, start, end, send = (self.aligner.to_tracer(hop.node, t) for t in (hop.t_recv, hop.t_start, hop.t_end,
                                                                                hop.t_send))
        return hop, recv, start, end, send

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
    gaps = [s.trace.t_out - s.trace.t_prev_out for s in steps if s.trace.t_prev_out is not None]  # every step
    out = {"steps": float(n), "pipeline_ms": sum(s.pipeline_ms for s in steps) / n,
           "head_ms": sum(s.head_ms or 0.0 for s in steps) / n,
           "cycle_ms": sum(s.cycle_ms or 0.0 for s in steps) / n,
           "observed_ms_per_token": sum(gap * 1e3 for gap in gaps) / n}
    if request in model.results:
        out["head_ms_per_token"] = model.results[request][1].ms_per_token
    return out


def replay(events: Iterable[dict[str, Any]], model: TraceModel | None = None) -> TraceModel:
    model = model or TraceModel()
    for event in events:
        model.apply(event)
    return model
