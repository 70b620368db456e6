"""Messages about the cluster: node status and telemetry, assignments and plans."""

from __future__ import annotations

from typing import Literal

from linguamq.schemas.errors import SchemaError
from linguamq.schemas.wire import ID_PATTERN, Message, Struct, spec, struct

NodeState = Literal["online", "loading", "ready", "draining", "offline"]


@struct
class NodeControl(Message):
    """Sent on `nodes/{node}/control` to change a running node (experiments, operators)."""

    TYPE = "node_control"

    node: str = spec(pattern=ID_PATTERN)
    slowdown: float | None = spec(ge=1, le=1000, default=None, doc="behave like a device this much slower")


@struct
class Profile(Struct):
    """A node's measured capability, as the planner's cost model consumes it."""

    ms_per_gflop_decode: float = spec(gt=0)
    ms_per_gflop_prefill: float = spec(gt=0)
    mem_budget_mb: float = spec(ge=0)
    rtt_ms: float = spec(ge=0)
    uplink_mbps: float = spec(gt=0)
    downlink_mbps: float = spec(gt=0)
    batch_cost: tuple[float, ...] = spec(
        gt=0, max_len=16, default=(),
        doc="time of a decode step of 2, 4, 8, ... sessions run as one batch over that of one (row k: 2**(k+1) "
            "sessions); empty: the node runs one session at a time")
    row_ms: float = spec(
        ge=0, default=0.0,
        doc="what each session of a batch costs beyond the first, besides the compute: its message received, "
            "decoded, encoded and sent (a node's status: its probe's floor; the planner uses Telemetry.row_ms "
            "once measured; 0: not known)")

    def batch_factor(self, rows: float) -> float:
        """Time of a decode step of ``rows`` sessions as one batch over that of one:
        ``batch_cost`` between its points (linear), its last slope beyond them; ``rows``
        without it (one session a call)."""
        if rows <= 1:
            return 1.0
        if not self.batch_cost:
            return rows
        xs = [1.0, *(2.0 ** (k + 1) for k in range(len(self.batch_cost)))]
        ys = [1.0, *self.batch_cost]
        k = next((i for i in range(1, len(xs)) if rows <= xs[i]), len(xs) - 1)
        return ys[k - 1] + (rows - xs[k - 1]) * (ys[k] - ys[k - 1]) / (xs[k] - xs[k - 1])

    def batch_ms(self, step_ms: float, rows: float) -> float:
        """A decode step of ``rows`` sessions on a stage whose one-session step costs
        ``step_ms``: one call (``batch_factor``) and a message in and out per session
        (``row_ms`` for each beyond the first, whose message ``step_ms`` holds). A node that
        runs one session a call repeats its whole step per session."""
        if rows <= 1:
            return step_ms
        if not self.batch_cost:
            return step_ms * rows
        return step_ms * self.batch_factor(rows) + (rows - 1) * self.row_ms


@struct
class NodeStatus(Message):
    """Retained on `nodes/{node}/status`; the node's will publishes state "offline"."""

    TYPE = "node_status"

    node: str = spec(pattern=ID_PATTERN)
    state: NodeState
    ts: float = spec(ge=0, doc="sender's wall clock, seconds since the epoch")
    version: str = spec(max_len=32, default="")
    platform: str = spec(max_len=64, default="")
    threads: int = spec(ge=0, le=1024, default=0)
    mem_budget_mb: float = spec(ge=0, default=0.0)
    epoch: int = spec(ge=0, default=0, doc="the last assignment epoch the node applied")
    profile: Profile | None = spec(default=None, doc="measured once the manifest is known")


@struct
class PieceTiming(Struct):
    piece: int = spec(ge=0)
    ms_ewma: float = spec(ge=0)
    runs: int = spec(ge=0)


@struct
class BatchTiming(Struct):
    """Decode steps of ``rows`` sessions run as one call on a segment (its first piece)."""
    piece: int = spec(ge=0)
    rows: int = spec(ge=2)
    ms_ewma: float = spec(ge=0)
    runs: int = spec(ge=0)


@struct
class Telemetry(Message):
    """Published about once a second on `nodes/{node}/telemetry` (not retained)."""

    TYPE = "telemetry"

    node: str = spec(pattern=ID_PATTERN)
    ts: float = spec(ge=0)
    seq: int = spec(ge=0)
    epoch: int = spec(ge=0)
    profile: Profile | None = None
    pieces: tuple[PieceTiming, ...] = spec(max_len=10_000, default=())
    batches: tuple[BatchTiming, ...] = spec(max_len=10_000, default=(), doc="steps run in batches, by size")
    queue_depth: int = spec(ge=0, default=0)
    sessions: int = spec(ge=0, default=0)
    kv_bytes: int = spec(ge=0, default=0)
    free_mem_mb: float = spec(ge=0, default=0.0)
    rss_mb: float = spec(ge=0, default=0.0)
    battery_pct: float | None = spec(ge=0, le=100, default=None)
    thermal_c: float | None = spec(ge=-100, le=200, default=None)
    rejected: int = spec(ge=0, default=0, doc="messages rejected since start")
    slowdown: float = spec(ge=1, default=1.0)
    busy_ms: float = spec(ge=0, default=0.0, doc="milliseconds spent running pieces since start (busy % between two reports)")
    row_ms: float | None = spec(
        ge=0, default=None,
        doc="CPU ms per session step outside the compute (receive, decode, sample, encode, publish), "
            "averaged over windows of batched steps (node/profile.py RowMeter); None: not measured yet")
    tokens: int = spec(ge=0, default=0, doc="tokens generated since start (the hub's head; tokens/s between two reports)")


@struct
class Segment(Struct):
    """A contiguous run of pieces [first, last] and where its output goes."""

    first: int = spec(ge=0)
    last: int = spec(ge=0)
    next_piece: int | None = spec(ge=0, doc="first piece of the next stage; None for the tail")

    def __post_init__(self) -> None:
        Struct.__post_init__(self)
        if self.last < self.first:
            raise SchemaError(f"last {self.last} < first {self.first}", field="last")


@struct
class Assignment(Message):
    """Retained on `nodes/{node}/assign`: what a node runs in an epoch."""

    TYPE = "assignment"

    node: str = spec(pattern=ID_PATTERN)
    epoch: int = spec(ge=0)
    manifest_sha256: str = spec(max_len=64)
    segments: tuple[Segment, ...] = spec(max_len=1024)
    prefetch: tuple[int, ...] = spec(ge=0, max_len=10_000, default=(), doc="pieces to pre-load, not run")
    stages: int = spec(ge=0, default=0, doc="stages of the epoch's plan (a node's batches: sessions / stages)")


@struct
class Stage(Struct):
    node: str = spec(pattern=ID_PATTERN)
    first: int = spec(ge=0)
    last: int = spec(ge=0)
    predicted_ms: float = spec(ge=0)
    measured_ms: float | None = spec(ge=0, default=None)


@struct
class LeftOut(Struct):
    node: str = spec(pattern=ID_PATTERN)
    why: str = spec(max_len=256)


@struct
class Plan(Message):
    """Retained on `plan`: the placement of an epoch, with its explanation."""

    TYPE = "plan"

    epoch: int = spec(ge=0)
    objective: Literal["latency", "throughput", "even"]
    stages: tuple[Stage, ...] = spec(max_len=1024)
    predicted_ms_per_token: float = spec(ge=0)
    measured_ms_per_token: float | None = spec(ge=0, default=None)
    bottleneck: str = spec(max_len=64, default="")
    reason: str = spec(max_len=512, default="")
    left_out: tuple[LeftOut, ...] = spec(max_len=1024, default=())
    solve_s: float = spec(ge=0, default=0.0)
    optimal: bool = True
    gap: float = spec(ge=0, default=0.0)
    sessions: int = spec(ge=1, default=1, doc="sessions in flight the plan was made for")
    predicted_tokens_per_s: float | None = spec(
        ge=0, default=None, doc="all sessions together, pipelined and in batches where nodes batch "
                                "(cost.pipelined_ms); None for an even split")


@struct
class ClockPing(Message):
    """On `nodes/{node}/ping`: a tracer asks a node for its clock (NTP-like exchange).

    The node answers on `clock/{client}` with a ClockPong echoing ``seq`` and ``t0``."""

    TYPE = "clock_ping"

    client: str = spec(pattern=ID_PATTERN, doc="who asks: the answer goes to clock/{client}")
    seq: int = spec(ge=0)
    t0: float = spec(ge=0, doc="asker's wall clock when sent, seconds")


@struct
class ClockPong(Message):
    """On `clock/{client}`: a node's answer to a ClockPing, in the node's wall clock.

    With t3 the asker's receive time: offset = ((t1 - t0) + (t2 - t3)) / 2 (node minus
    asker), rtt = (t3 - t0) - (t2 - t1); the sample with the least rtt is the best."""

    TYPE = "clock_pong"

    node: str = spec(pattern=ID_PATTERN)
    seq: int = spec(ge=0)
    t0: float = spec(ge=0, doc="echoed from the ping")
    t1: float = spec(ge=0, doc="node's wall clock when the ping arrived")
    t2: float = spec(ge=0, doc="node's wall clock when the answer left")
