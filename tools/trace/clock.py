"""Clock alignment: NTP-style offsets of the nodes' clocks relative to the tracer's."""

from __future__ import annotations

import bisect
import dataclasses
import threading
from collections import deque
from typing import Any

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
