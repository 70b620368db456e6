"""Topic followers: a connection of their own that records what arrives on one filter while a
``with`` block runs (the benches and chaos cases watch plans, hops and responses this way)."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any, Self

from linguamq import topics
from linguamq.schemas.cluster import Plan, Profile, Telemetry
from linguamq.topics.client import MqttClient


class Follower:
    """Follows one topic filter on a connection of its own while in a ``with`` block (the
    subscription is in place when the block starts); ``_on`` records what arrives, under
    ``_lock``: it runs on the MQTT thread while the bench reads."""

    def __init__(self, url: str, client_id: str, topic: topics.Topic, filter_: str) -> None:
        self._client = MqttClient(url=url, client_id=client_id)
        self._topic, self._filter = topic, filter_
        self._lock = threading.Lock()

    def __enter__(self) -> Self:
        self._client.start()
        self._client.subscribe(self._topic, self._filter, self._on, wait=10.0)
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.stop()

    def _on(self, topic: str, value: Any, retained: bool) -> None:
        raise NotImplementedError


class PlanLog(Follower):
    """Every retained plan published (re-publications included), with its arrival time, on
    a connection of its own: `wait_ready` unsubscribes from the plan topic on its client."""

    def __init__(self, url: str, cluster: str) -> None:
        super().__init__(url, f"plans-{cluster}", topics.PLAN, topics.PLAN.build(cluster))
        self._seen: list[tuple[float, Plan]] = []

    def _on(self, _topic: str, plan: Plan, _retained: bool) -> None:
        with self._lock:
            self._seen.append((time.monotonic(), plan))

    def plans(self) -> list[tuple[float, Plan]]:
        """(monotonic arrival time, plan), oldest first."""
        with self._lock:
            return list(self._seen)

    @property
    def latest(self) -> Plan | None:
        seen = self.plans()
        return seen[-1][1] if seen else None

    def epochs(self) -> list[tuple[float, int]]:
        """(arrival time, epoch) of each plan that started a new epoch."""
        out: list[tuple[float, int]] = []
        for t, plan in self.plans():
            if not out or out[-1][1] != plan.epoch:
                out.append((t, plan.epoch))
        return out

    def wait_for(self, predicate: Callable[[Plan], bool], timeout: float) -> tuple[float, Plan] | None:
        """The first plan (and its arrival time) that satisfies ``predicate``, or None."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = next(((t, p) for t, p in self.plans() if predicate(p)), None)
            if found:
                return found
            time.sleep(0.1)
        return None


Totals = dict[str, dict[int, int]]  # TelemetryLog.totals(): node -> rows -> runs (rows 1: all decode calls)


class TelemetryLog(Follower):
    """Per node, the decode calls its segments ran and the decode steps it ran in batches (a
    prompt's chunks are not counted: telemetry times decode steps only), summed over
    every telemetry report since the block started (a node's counts restart with each
    assignment it applies: a report of another epoch counts from zero). A segment's ``runs``
    counts its batches only on a node with a batch cost (every node that batches, once it has
    measured itself)."""

    def __init__(self, url: str, cluster: str) -> None:
        super().__init__(url, f"telemetry-{cluster}", topics.NODE_TELEMETRY, topics.NODE_TELEMETRY.filter(cluster))
        self._last: dict[str, tuple[int, dict[tuple[int, int], int]]] = {}  # node -> (epoch, (piece, rows) -> runs)
        self._total: Totals = {}
        self._busy: dict[str, float] = {}  # node -> busy_ms of its last report (since the node started)
        self._profiles: dict[str, Profile] = {}  # node -> its profile (row_ms: its probe's)
        self._row_ms: dict[str, float] = {}  # node -> its last measured Telemetry.row_ms

    def _on(self, _topic: str, report: Telemetry, _retained: bool) -> None:
        runs = {(t.piece, 1): t.runs for t in report.pieces} | {(b.piece, b.rows): b.runs for b in report.batches}
        with self._lock:
            epoch, last = self._last.get(report.node, (report.epoch, {}))
            total = self._total.setdefault(report.node, {})
            for key, count in runs.items():
                was = last.get(key, 0) if epoch == report.epoch else 0
                total[key[1]] = total.get(key[1], 0) + count - was
            self._last[report.node] = (report.epoch, runs)
            self._busy[report.node] = report.busy_ms
            if report.profile is not None:
                self._profiles[report.node] = report.profile
            if report.row_ms is not None:
                self._row_ms[report.node] = report.row_ms

    def totals(self) -> Totals:
        with self._lock:
            return {node: dict(t) for node, t in self._total.items()}

    def profiles(self) -> dict[str, Profile]:
        """Per node, the profile of its last report, ``row_ms`` the one it measured where it
        reported one (Telemetry.row_ms)."""
        with self._lock:
            return {node: dataclasses.replace(p, row_ms=self._row_ms[node]) if node in self._row_ms else p
                    for node, p in self._profiles.items()}

    def row_ms(self) -> dict[str, float]:
        """Per node that measured one, its last Telemetry.row_ms."""
        with self._lock:
            return dict(self._row_ms)

    def busy(self) -> dict[str, float]:
        """Per node, the ms it has spent running pieces since it started: with one thread its
        compute's CPU time times its slowdown (the emulated device's busy time, not the process's)."""
        with self._lock:
            return dict(self._busy)


def rows_per_call(spans: list[tuple[Totals, Totals]]) -> dict[str, dict[str, float]]:
    """Per node, over (before, after) pairs of ``TelemetryLog.totals``: the decode calls its
    segments ran, the session steps in them, steps per call and the share of steps run in batches."""
    delta: dict[str, dict[int, int]] = {}
    for before, after in spans:
        for node, now in after.items():
            d = delta.setdefault(node, {})
            for rows, runs in now.items():
                d[rows] = d.get(rows, 0) + runs - before.get(node, {}).get(rows, 0)
    out = {}
    for node, d in delta.items():
        calls = d.get(1, 0)
        in_batches = sum(rows * runs for rows, runs in d.items() if rows > 1)
        steps = calls + sum((rows - 1) * runs for rows, runs in d.items() if rows > 1)
        out[node] = {"calls": calls, "steps": steps, "rows_per_call": steps / calls if calls else 0.0,
                     "batched_share": in_batches / steps if steps else 0.0}
    return out
