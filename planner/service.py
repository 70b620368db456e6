"""The live planner: watches node status, publishes the retained plan and assignments.

A new epoch is published only when the set of nodes that can take part changes (join,
leave, will message); state changes of the same nodes (loading -> ready) do not replan.
Changes are debounced for ``settle_s`` so that nodes starting together get one plan.
"""

from __future__ import annotations

import threading
import time

import structlog

from linguamq import topics
from linguamq.planner.placement import Candidate, Placement, PlacementError, assignments, even_split
from linguamq.schemas.cluster import NodeStatus, Plan
from linguamq.schemas.manifest import ModelManifest
from linguamq.topics.client import MqttClient

log = structlog.get_logger()


class PlannerService:
    def __init__(self, *, client: MqttClient, cluster: str, manifest: ModelManifest, manifest_sha256: str,
                 placement: Placement = even_split, settle_s: float = 1.0, min_nodes: int = 1) -> None:
        """``min_nodes``: how many nodes the first plan waits for (later plans follow the nodes)."""
        self._client, self._cluster = client, cluster
        self._manifest, self._manifest_sha = manifest, manifest_sha256
        self._placement, self._settle_s, self._min_nodes = placement, settle_s, min_nodes
        self._status: dict[str, NodeStatus] = {}
        self._lock = threading.Lock()
        self._changed_at: float | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.plan: Plan | None = None
        self._planned_for: frozenset[str] = frozenset()  # the members self.plan was made for
        self._last_epoch = 0

    def start(self) -> None:
        self._client.subscribe(topics.PLAN, topics.PLAN.build(self._cluster), self._on_plan)
        self._client.subscribe(topics.NODE_STATUS, topics.NODE_STATUS.filter(self._cluster), self._on_status)
        self._thread = threading.Thread(target=self._run, name="planner", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # --- inputs (network thread) -----------------------------------------------------

    def _on_plan(self, topic: str, plan: Plan, retained: bool) -> None:
        with self._lock:  # a restarted hub continues the epoch count of the retained plan
            self._last_epoch = max(self._last_epoch, plan.epoch)

    def _on_status(self, topic: str, status: NodeStatus, retained: bool) -> None:
        node = topics.parse(topic)["node"]
        if status.node != node:
            return self._client.report_error(self._cluster, reporter="planner", to=str(node), topic=topic,
                                             code="bad_payload", message=f"status names node {status.node!r}")
        with self._lock:
            before = self._members()
            self._status[node] = status
            if self._members() != before:
                self._changed_at = time.monotonic()

    def _members(self) -> frozenset[str]:
        return frozenset(n for n, s in self._status.items() if s.state != "offline")

    # --- replanning (own thread) -----------------------------------------------------

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            with self._lock:
                due = self._changed_at is not None and time.monotonic() - self._changed_at >= self._settle_s
                if due:
                    self._changed_at = None
                    members = {n: self._status[n] for n in self._members()}
            if due:
                self._replan(members)

    def _replan(self, members: dict[str, NodeStatus]) -> None:
        if self.plan is None and len(members) < self._min_nodes:  # only the first plan waits
            log.info("waiting for nodes", online=len(members), needed=self._min_nodes)
            return
        if frozenset(members) == self._planned_for:
            return
        with self._lock:
            epoch = self._last_epoch = self._last_epoch + 1
        candidates = [Candidate(name=n, mem_budget_mb=s.mem_budget_mb) for n, s in members.items()]
        try:
            plan = self._placement(self._manifest, candidates, epoch)
        except PlacementError as exc:
            log.error("no placement", error=str(exc))
            return
        self._publish(plan, members)

    def _publish(self, plan: Plan, members: dict[str, NodeStatus]) -> None:
        everyone = set(members) | self._planned_for  # nodes that left get an empty assignment
        for node, assignment in assignments(plan, self._manifest_sha, sorted(everyone)).items():
            self._client.publish(topics.NODE_ASSIGN, topics.NODE_ASSIGN.build(self._cluster, node=node),
                                 assignment, wait=5.0)
        self._client.publish(topics.PLAN, topics.PLAN.build(self._cluster), plan, wait=5.0)
        self._planned_for = frozenset(members)
        self.plan = plan
        log.info("plan published", epoch=plan.epoch, reason=plan.reason,
                 stages=[f"{s.node}:{s.first}-{s.last}" for s in plan.stages])
