"""What the dashboard shows: the cluster as its retained and telemetry topics tell it.

``ClusterView`` follows the model, the plan, every node's status and telemetry and the hub's
telemetry on one connection (paho's thread), and keeps a snapshot that ``snapshot()`` returns
as plain JSON-able data. Waiters (the dashboard's event streams, on the server's event loop)
are woken on every change; ``changes()`` throttles what each of them sends.

The snapshot, as the page reads it (times are Unix seconds; unknown values are null):

    {"cluster", "now",
     "model": {"name", "family", "quantization", "layers", "pieces": [kind, ...]} | null,
     "nodes": [{"name", "online", "state", "platform", "version", "threads", "mem_budget_mb",
                "profile": {"ms_per_gflop_decode", ...} | null, "rss_mb", "free_mem_mb",
                "battery_pct", "thermal_c", "busy_pct", "sessions", "queue_depth", "kv_mb",
                "errors", "slowdown", "seen_s_ago"}, ...],           # sorted by name
     "plan": {"epoch", "objective", "stages": [{"node", "first", "last", "predicted_ms",
              "measured_ms"}], "predicted_ms_per_token", "measured_ms_per_token",
              "bottleneck", "reason", "left_out": [{"node", "why"}], "sessions",
              "predicted_tokens_per_s", ...} | null,                 # the Plan message's fields
     "epochs": [{"epoch", "at", "reason", "nodes": [...], "predicted_ms_per_token"}, ...],  # newest first
     "requests": {"in_flight", "queued", "rejected"} | null,          # null: no hub telemetry yet
     "tokens_per_s": [[t, rate], ...]}                                # the last THROUGHPUT_WINDOW_S

Pieces index the model's layers: ``first``/``last`` of a stage are piece indexes (0 is the
embedding, the last is the head), so a plan bar is ``len(pieces)`` cells coloured by stage.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from linguamq import topics
from linguamq.schemas.cluster import NodeStatus, Plan, Telemetry
from linguamq.schemas.manifest import ModelManifest
from linguamq.topics.client import MqttClient

EPOCHS_KEPT = 20
THROUGHPUT_WINDOW_S = 300.0
MIN_INTERVAL_S = 0.25  # a stream sends at most this often (telemetry arrives every second per node)
KEEPALIVE_S = 15.0
SILENT_S = 10.0  # a node that sent no telemetry for this long shows offline ("silent"); it reports every second  # and at least this often (proxies close silent streams; ages on the page move on)


class ClusterView:
    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        self._lock = threading.Lock()
        self.model: ModelManifest | None = None
        self.plan: Plan | None = None
        self._status: dict[str, NodeStatus] = {}
        self._telemetry: dict[str, tuple[float, Telemetry]] = {}  # node -> (arrival, report)
        self._busy: dict[str, float | None] = {}  # node -> busy % between its last two reports
        self._hub: Telemetry | None = None
        self._tokens: collections.deque[tuple[float, float]] = collections.deque()  # (t, tokens/s)
        self._epochs: collections.deque[dict[str, Any]] = collections.deque(maxlen=EPOCHS_KEPT)
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self.version = 0
        self._model_seen = threading.Event()

    def follow(self, client: MqttClient) -> None:
        """Subscribe on ``client`` (retained messages arrive at once). Needs a login that may
        read these topics: none on an open cluster, a hub-role user on a secured one."""
        c = self.cluster
        client.subscribe(topics.MODEL, topics.MODEL.build(c), self._on_model, wait=10.0)
        client.subscribe(topics.PLAN, topics.PLAN.build(c), self._on_plan, wait=10.0)
        client.subscribe(topics.NODE_STATUS, topics.NODE_STATUS.filter(c), self._on_status, wait=10.0)
        client.subscribe(topics.NODE_TELEMETRY, topics.NODE_TELEMETRY.filter(c), self._on_telemetry, wait=10.0)
        client.subscribe(topics.HUB_TELEMETRY, topics.HUB_TELEMETRY.build(c), self._on_hub, wait=10.0)

    # --- MQTT handlers (paho's thread) ---------------------------------------------------

    def _on_model(self, _topic: str, manifest: ModelManifest, _retained: bool) -> None:
        with self._lock:
            self.model = manifest
        self._model_seen.set()
        self._changed()

    def wait_model(self, timeout: float) -> bool:
        """Whether the cluster's model manifest (retained: there at once if a hub runs) arrived."""
        return self._model_seen.wait(timeout)

    def _on_plan(self, _topic: str, plan: Plan, _retained: bool) -> None:
        with self._lock:
            if self.plan is None or plan.epoch != self.plan.epoch:
                self._epochs.appendleft({"epoch": plan.epoch, "at": time.time(), "reason": plan.reason,
                                         "nodes": [s.node for s in plan.stages],
                                         "predicted_ms_per_token": plan.predicted_ms_per_token})
            self.plan = plan
        self._changed()

    def _on_status(self, _topic: str, status: NodeStatus, _retained: bool) -> None:
        with self._lock:
            self._status[status.node] = status
        self._changed()

    def _on_telemetry(self, _topic: str, report: Telemetry, _retained: bool) -> None:
        now = time.monotonic()
        with self._lock:
            before = self._telemetry.get(report.node)
            if before is not None and report.ts > before[1].ts and report.busy_ms >= before[1].busy_ms:
                share = (report.busy_ms - before[1].busy_ms) / ((report.ts - before[1].ts) * 1e3)  # node's clock
                self._busy[report.node] = round(min(100.0, 100.0 * share), 1)
            self._telemetry[report.node] = (now, report)
        self._changed()

    def _on_hub(self, _topic: str, report: Telemetry, _retained: bool) -> None:
        now = time.time()
        with self._lock:
            before = self._hub
            if before is not None and report.ts > before.ts and report.tokens >= before.tokens:
                self._tokens.append((now, (report.tokens - before.tokens) / (report.ts - before.ts)))
            while self._tokens and self._tokens[0][0] < now - THROUGHPUT_WINDOW_S:
                self._tokens.popleft()
            self._hub = report
        self._changed()

    # --- readers -------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {"cluster": self.cluster, "now": time.time(), "model": self._model(), "nodes": self._nodes(),
                    "plan": self._plan(), "epochs": list(self._epochs),
                    "requests": None if self._hub is None else {"in_flight": self._hub.sessions,
                                                                 "queued": self._hub.queue_depth,
                                                                 "rejected": self._hub.rejected},
                    "tokens_per_s": [[round(t, 3), round(r, 2)] for t, r in self._tokens]}

    def _model(self) -> dict[str, Any] | None:
        m = self.model
        return None if m is None else {"name": m.name, "family": m.family, "quantization": m.quantization,
                                       "layers": m.num_layers, "pieces": [p.kind for p in m.pieces]}

    def _plan(self) -> dict[str, Any] | None:
        if self.plan is None:
            return None
        plan = self.plan.to_dict()
        for key in ("type", "v"):
            plan.pop(key, None)
        return plan

    def _nodes(self) -> list[dict[str, Any]]:
        now = time.monotonic()
        rows = []
        for name in sorted(self._status.keys() | self._telemetry.keys()):
            status = self._status.get(name)
            arrival, report = self._telemetry.get(name, (None, None))
            silent = arrival is not None and now - arrival > SILENT_S
            profile = status.profile if status is not None else None
            rows.append({
                "name": name,
                # Offline by its will, or silent: no report for SILENT_S (a node the broker lost
                # while it was down, or this gateway's view after the broker restarted).
                "online": status is not None and status.state != "offline" and not silent,
                "state": "silent" if silent and status is not None and status.state != "offline"
                else status.state if status is not None else None,
                "platform": status.platform if status else None, "version": status.version if status else None,
                "threads": status.threads if status else None,
                "mem_budget_mb": status.mem_budget_mb if status else None,
                "profile": None if profile is None else profile.to_dict(),
                "rss_mb": report.rss_mb if report else None, "free_mem_mb": report.free_mem_mb if report else None,
                "battery_pct": report.battery_pct if report else None,
                "thermal_c": report.thermal_c if report else None,
                "busy_pct": self._busy.get(name), "sessions": report.sessions if report else None,
                "queue_depth": report.queue_depth if report else None,
                "kv_mb": round(report.kv_bytes / 2**20, 1) if report else None,
                "errors": report.rejected if report else None, "slowdown": report.slowdown if report else None,
                "seen_s_ago": None if arrival is None else round(now - arrival, 1),
            })
        return rows

    # --- change notification (the server's event loop) -------------------------------------

    def _changed(self) -> None:
        with self._lock:
            self.version += 1
            waiters = list(self._waiters)
        for loop, event in waiters:
            try:
                loop.call_soon_threadsafe(event.set)
            except RuntimeError:  # that loop has closed: its stream is gone
                pass

    async def changes(self) -> AsyncIterator[dict[str, Any]]:
        """Snapshots, the first at once, then one per change (at most every MIN_INTERVAL_S,
        at least every KEEPALIVE_S). Ends when the consumer stops iterating."""
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        with self._lock:
            self._waiters.add(waiter)
        try:
            while True:
                event.clear()
                yield self.snapshot()
                await asyncio.sleep(MIN_INTERVAL_S)
                if not event.is_set():
                    try:
                        await asyncio.wait_for(event.wait(), KEEPALIVE_S)
                    except TimeoutError:
                        pass
        finally:
            with self._lock:
                self._waiters.discard(waiter)
