"""The live planner: follows node status and telemetry, publishes retained plans.

A new epoch is published when
- the set of nodes that can take part changes (join, leave, will message): always,
  after the set has been stable for ``settle_s`` (nodes starting together get one plan);
- a node drifts: its measured stage time stays beyond ``drift_ratio`` of the prediction
  for ``drift_reports`` telemetry reports in a row; its profile is corrected by the
  measured ratio and the plan re-solved, but the new plan is adopted only if it is
  predicted ``hysteresis`` faster than the current one under the corrected profiles
  (moving weights is not free; a steady cluster publishes no new epoch). A node not
  measured yet is assumed off by as much as the measured nodes' probes were when first
  measured (the median), so that correcting one node's probe does not make the others
  look faster; a stage without FLOPs (the embedding alone) is never judged. A node's
  correction is learned on the segment it runs, and the model's error is not the same for
  every segment: a proposal's stages that the current plan does not have are valued by what
  that (node, segment) measured when it last ran, where that is slower than the corrected
  prediction and at most ``segment_memory_s`` old (corrected on one segment, the other plan
  looked faster, then the first again: `bench hetero` (b) alternated between two plans every
  4-8 s). A node that drifts on a segment it had run as predicted (``drift_reports`` reports
  in a row) in that epoch changed speed: what its other segments measured is scaled by the
  same ratio (a node recovered from a throttle takes its old segment back at once; one that
  recovers within its first reports on the new segment waits for the memory to expire).
A node's measured cost per session step outside its compute (Telemetry.row_ms, which a
batch pays per session) replaces its probe's once it differs by ``drift_ratio``; a node of
the plan that batches then asks for a drift round (``_note_row_cost``).
State changes of the same nodes (loading -> ready) never replan. Every few seconds the
retained plan is re-published under the same epoch with measured figures beside the
predicted ones, so `linguamq plan` and tracers can show how good the prediction is.

When no placement fits the nodes left (too little memory), an epoch with no stages is
published, its reason the planner's error: the head fails in-flight and new requests
with it instead of letting them wait. Epochs only grow, across hub restarts too: the
count continues from the retained plan and from the epoch each node reports in its
status (a new hub's broker has no retained plan, and nodes ignore assignments older
than the one they hold).
"""

from __future__ import annotations

import dataclasses
import statistics
import threading
import time
from typing import Literal

import structlog

from linguamq import topics
from linguamq.planner import cost
from linguamq.planner.placement import Candidate, PlacementError, assignments, device_of, even_split, planned
from linguamq.schemas.cluster import NodeStatus, Plan, Profile, Stage, Telemetry
from linguamq.schemas.manifest import ModelManifest
from linguamq.topics.client import MqttClient

log = structlog.get_logger()
RETRY_S = 1.0  # pause after a failed replanning round before the next
ROW_MS_SLACK = 0.2  # ms: a measured row cost this close to the one in use changes nothing


@dataclasses.dataclass(frozen=True, kw_only=True)
class PlannerSettings:
    objective: Literal["latency", "throughput", "even"] = "latency"  # even: LinguaLinked's baseline

    @property
    def scored(self) -> cost.Objective:
        """The objective a plan's speed is judged by (an even split is judged as a single stream)."""
        return "latency" if self.objective == "even" else self.objective
    max_sessions: int = 1  # KV memory reserved per node, and sessions in flight (throughput)
    settle_s: float = 1.0
    min_nodes: int = 1  # the first plan waits for this many nodes
    profile_wait_s: float = 15.0  # a new node without a profile is waited for this long
    drift_ratio: float = 1.3
    drift_reports: int = 3
    hysteresis: float = 0.10
    explain_s: float = 5.0
    time_limit_s: float = 5.0
    segment_memory_s: float = 60.0  # how long what a (node, segment) measured values a proposal


class PlannerService:
    def __init__(self, *, client: MqttClient, cluster: str, manifest: ModelManifest, manifest_sha256: str,
                 settings: PlannerSettings = PlannerSettings()) -> None:
        self._client, self._cluster, self.settings = client, cluster, settings
        self._manifest, self._manifest_sha = manifest, manifest_sha256
        self._costs = cost.CostSettings(max_context=manifest.max_context, max_sessions=settings.max_sessions)
        self._placement = (even_split if settings.objective == "even" else
                           planned(settings.scored, settings=self._costs, time_limit_s=settings.time_limit_s))
        self._lock = threading.Lock()
        self._status: dict[str, NodeStatus] = {}
        self._joined: dict[str, float] = {}
        self._scale: dict[str, float] = {}  # measured / profiled compute, per measured node
        self._calibration: dict[str, float] = {}  # each node's scale when first measured: how far its probe was off
        self._first: dict[str, float] = {}  # the scale each node's first measurement implied, until confirmed
        self._drift: dict[str, int] = {}  # consecutive drifting reports
        self._measured: dict[str, float] = {}  # stage compute ms (EWMA) per node
        self._row_ms: dict[str, float] = {}  # each node's measured cost per session step (Telemetry.row_ms)
        # (node, first, last) -> (compute ms EWMA, monotonic time): what each segment measured
        # when it last ran, kept across epochs (see the module docstring)
        self._segments: dict[tuple[str, int, int], tuple[float, float]] = {}
        self._in_band: dict[str, int] = {}  # consecutive reports within the drift band, this epoch
        self._steady: set[str] = set()  # nodes measured as predicted in this epoch (see _rescale_segments)
        self._changed_at: float | None = None
        self._drift_due = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.plan: Plan | None = None
        self._planned_for: frozenset[str] = frozenset()  # the members self.plan was made for
        self._last_epoch = 0
        self.rejected = 0  # payloads refused; the hub's head publishes the count in its telemetry
        self.errors = 0  # rounds of the replanning thread that failed (logged, then tried again)

    def start(self) -> None:
        c, cl = self._client, self._cluster
        c.subscribe(topics.PLAN, topics.PLAN.build(cl), self._on_plan, on_reject=self._reject)
        c.subscribe(topics.NODE_STATUS, topics.NODE_STATUS.filter(cl), self._on_status, on_reject=self._reject)
        c.subscribe(topics.NODE_TELEMETRY, topics.NODE_TELEMETRY.filter(cl), self._on_telemetry,
                    on_reject=self._reject)
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
        node = _node_of(topic)
        if status.node != node:  # one node speaking for another, or a topic that breaks the id rules
            self.rejected += 1
            return self._client.report_error(self._cluster, reporter="planner", to=node or "planner", topic=topic,
                                             code="bad_payload",
                                             message=f"status names node {status.node!r}, not its topic's")
        with self._lock:
            self._last_epoch = max(self._last_epoch, status.epoch)  # a restarted hub continues the count
            before = self._members()
            if status.state == "offline":
                self._joined.pop(node, None)
                self._segments = {k: v for k, v in self._segments.items() if k[0] != node}
                self._row_ms.pop(node, None)
            else:
                self._joined.setdefault(node, time.monotonic())
            self._status[node] = status
            if self._members() != before or (status.profile and node in self._members() - self._planned_for):
                self._changed_at = time.monotonic()

    def _reject(self, topic: str, payload: bytes, exc: Exception) -> None:
        """A plan, status or telemetry that does not decode (the head, following plan and status
        too, leaves the report to the planner: one per message)."""
        self.rejected += 1
        self._client.report_error(self._cluster, reporter="planner", to="planner", topic=topic, code="bad_payload",
                                  message=str(exc))

    def _on_telemetry(self, topic: str, report: Telemetry, retained: bool) -> None:
        if _node_of(topic) != report.node:  # one node speaking for another, or a topic that breaks the id rules
            self.rejected += 1
            return self._client.report_error(self._cluster, reporter="planner", to="planner", topic=topic,
                                             code="bad_payload",
                                             message=f"telemetry names node {report.node!r}, not its topic's")
        with self._lock:
            if report.row_ms is not None:
                self._note_row_cost(report.node, report.row_ms)
            stage = self._stage_of(report.node)
            if stage is None or report.epoch != (self.plan.epoch if self.plan else -1):
                return
            timing = next((t for t in report.pieces if t.piece == stage.first), None)
            if timing is None or timing.runs < 3:
                return
            self._measured[report.node] = timing.ms_ewma
            self._segments[(report.node, stage.first, stage.last)] = (timing.ms_ewma, time.monotonic())
            if self.settings.objective == "even":
                return
            predicted = self._predicted_compute(stage)
            if predicted <= 0:  # no FLOPs (an embedding lookup alone): nothing to scale a profile by
                return
            ratio = timing.ms_ewma / predicted
            drifting = ratio > self.settings.drift_ratio or ratio < 1 / self.settings.drift_ratio
            self._first.setdefault(report.node, self._scale_of(report.node) * ratio)
            if not drifting and report.node not in self._calibration:  # first measured, as predicted
                self._scale[report.node] = self._calibration[report.node] = self._scale_of(report.node)
            self._drift[report.node] = self._drift.get(report.node, 0) + 1 if drifting else 0
            self._in_band[report.node] = 0 if drifting else self._in_band.get(report.node, 0) + 1
            if self._in_band[report.node] >= self.settings.drift_reports:
                self._steady.add(report.node)
            if self._drift[report.node] >= self.settings.drift_reports:
                if report.node in self._steady:  # it changed speed on a segment it ran as predicted
                    self._rescale_segments(report.node, (stage.first, stage.last), ratio)
                self._scale[report.node] = self._scale_of(report.node) * ratio
                # The probe's error is what the first measurement showed: a node slowed before
                # its drift was confirmed (3 reports) is slower, and its probe no more wrong.
                self._calibration.setdefault(report.node, self._first[report.node])
                self._drift[report.node] = 0
                self._drift_due = True
                log.info("node drifted", node=report.node, measured_over_predicted=round(ratio, 2))

    def _note_row_cost(self, node: str, ms: float) -> None:
        """A node's measured cost per session step (Telemetry.row_ms) replaces the one the
        planner uses (first its probe's, which sees only the messages: 0.15-0.33 against 1.25-2.2 ms
        measured in `bench hetero` (b)) once it differs by ``drift_ratio`` and ROW_MS_SLACK; a
        node of the current plan that batches then asks for a drift round (the plan is kept
        unless another is predicted ``hysteresis`` faster). Under ``self._lock``."""
        status = self._status.get(node)
        profile = status.profile if status is not None else None
        if profile is None:
            return
        used = self._row_ms.get(node, profile.row_ms)
        if abs(ms - used) < ROW_MS_SLACK or (used > 0 and 1 / self.settings.drift_ratio <= ms / used
                                              <= self.settings.drift_ratio):
            return
        self._row_ms[node] = ms
        log.info("row cost measured", node=node, row_ms=round(ms, 3), was=round(used, 3))
        if (self._stage_of(node) is not None and profile.batch_cost and self.settings.objective == "throughput"
                and self.settings.max_sessions > 1):
            self._drift_due = True

    def _rescale_segments(self, node: str, current: tuple[int, int], ratio: float) -> None:
        """``node`` drifted by ``ratio`` on a segment it had run as predicted in this epoch: it
        changed speed (a throttle, or its end), and what its other segments measured before is
        scaled alike. A drift in an epoch's first reports is a segment the model mispredicts,
        and what the others measured stands (the service's docstring). Under ``self._lock``."""
        for (n, first, last), (ms, at) in list(self._segments.items()):
            if n == node and (first, last) != current:
                self._segments[(n, first, last)] = (ms * ratio, at)

    def _scale_of(self, node: str) -> float:
        """Measured over profiled compute of ``node``. A node not measured yet (idle, or new)
        is assumed off by as much as the measured nodes' probes were when first measured:
        the probe times one layer alone and warm in the CPU cache, and a real segment runs
        slower by a factor common to the nodes of a cluster; correcting only the measured
        nodes would make every unmeasured one look faster than it is and move work to it
        (a replan per node as each gets measured in turn, on a steady cluster)."""
        if node in self._scale:
            return self._scale[node]
        return statistics.median(self._calibration.values()) if self._calibration else 1.0

    def _members(self) -> frozenset[str]:
        return frozenset(n for n, s in self._status.items() if s.state != "offline")

    def _stage_of(self, node: str) -> Stage | None:
        return next((s for s in self.plan.stages if s.node == node), None) if self.plan else None

    # --- cost views ------------------------------------------------------------------

    def _candidate(self, node: str) -> Candidate:
        status = self._status[node]
        profile = status.profile
        if profile is not None and self._scale_of(node) != 1.0:
            k = self._scale_of(node)
            profile = dataclasses.replace(profile, ms_per_gflop_decode=profile.ms_per_gflop_decode * k,
                                          ms_per_gflop_prefill=profile.ms_per_gflop_prefill * k)
        if profile is not None and node in self._row_ms:
            profile = dataclasses.replace(profile, row_ms=self._row_ms[node])
        return Candidate(name=node, mem_budget_mb=status.mem_budget_mb, profile=profile)

    def _problem(self, nodes) -> cost.Problem:
        return cost.Problem(pieces=cost.pieces_of(self._manifest), devices=tuple(device_of(self._candidate(n))
                                                                                  for n in nodes),
                            settings=self._costs)

    def _predicted_compute(self, stage: Stage) -> float:
        problem = self._problem([stage.node])
        return cost.compute_ms(problem, problem.devices[0], stage.first, stage.last)

    def _value(self, plan: Plan, *, against: Plan | None = None) -> float:
        """``plan``'s objective under the current (corrected) profiles. ``against``: ``plan``
        is a proposal to replace that plan, and a stage of it that the plan does not have is
        valued by what its node measured on that segment within ``segment_memory_s`` where
        that was slower (the stages both have are valued alike on both sides). Under ``self._lock``."""
        problem = self._problem([s.node for s in plan.stages])
        shared = {(s.node, s.first, s.last) for s in against.stages} if against is not None else None
        times = []
        for device, stage in zip(problem.devices, plan.stages):
            ms = cost.stage_ms(problem, device, stage.first, stage.last)
            key = (stage.node, stage.first, stage.last)
            seen = self._segments.get(key) if shared is not None and key not in shared else None
            if seen is not None and time.monotonic() - seen[1] <= self.settings.segment_memory_s:
                ms += max(0.0, seen[0] - cost.compute_ms(problem, device, stage.first, stage.last))
            times.append(ms)
        return cost.objective_value(self.settings.scored, times, self._costs.max_sessions,
                                    [d.profile for d in problem.devices])

    # --- replanning (own thread) -----------------------------------------------------

    def _run(self) -> None:
        """One round every 50 ms. A round that fails (a publish that times out in a broker
        blip, a solver that crashes) is logged and counted, and what it was doing is tried
        again: a dead thread would leave the cluster on its last plan for good."""
        last_explained = time.monotonic()
        while not self._stop.wait(0.05):
            try:
                self._replan_if_due()
            except Exception:
                self.errors += 1
                log.exception("replanning failed, will try again", errors=self.errors)
                self._stop.wait(RETRY_S)  # a broker in trouble is not asked again at once
            if time.monotonic() - last_explained >= self.settings.explain_s:
                last_explained = time.monotonic()
                try:
                    self._explain()
                except Exception:  # the next explanation is due in explain_s anyway
                    self.errors += 1
                    log.exception("plan explanation failed", errors=self.errors)

    def _replan_if_due(self) -> None:
        with self._lock:
            members = self._members()
            due = self._changed_at is not None and time.monotonic() - self._changed_at >= self.settings.settle_s
            drift, self._drift_due = self._drift_due, False
        try:
            if due:
                self._on_members(members)
            elif drift:
                self._on_drift(members)
        except Exception:
            with self._lock:  # due again: the epoch that failed is not the plan
                if due:
                    self._changed_at = time.monotonic()
                else:
                    self._drift_due = self._drift_due or drift
            raise

    def _on_members(self, members: frozenset[str]) -> None:
        with self._lock:
            if self.plan is None and len(members) < self.settings.min_nodes:  # only the first plan waits
                self._changed_at = None
                return log.info("waiting for nodes", online=len(members), needed=self.settings.min_nodes)
            waiting = [n for n in members if self._status[n].profile is None
                       and time.monotonic() - self._joined.get(n, 0) < self.settings.profile_wait_s]
            if waiting and self.settings.objective != "even":
                self._changed_at = time.monotonic()  # look again once they have measured themselves
                return
            self._changed_at = None
            if members == self._planned_for:
                return
            reason = _membership_reason(self._planned_for, members)
        self._solve_and_publish(members, reason)

    def _on_drift(self, members: frozenset[str]) -> None:
        current = self.plan
        if current is None:
            return
        proposal = self._solve(members)
        if proposal is None or not proposal.stages:
            return
        with self._lock:  # both on one state; by objective (a throughput plan's predicted_ms_per_token is its latency)
            before, after = self._value(current), self._value(proposal, against=current)
        if after < before * (1 - self.settings.hysteresis):
            self._publish(proposal, members, f"drift: current plan now predicted {before:.1f} ms/token")
        else:
            log.info("drift absorbed, plan kept", current_ms=round(before, 2), best_ms=round(after, 2))

    def _solve_and_publish(self, members: frozenset[str], reason: str) -> None:
        plan = self._solve(members)
        if plan is not None and (plan.stages or self.plan is None or self.plan.stages):
            self._publish(plan, members, reason)  # one empty epoch per failure, not one per change

    def _solve(self, members: frozenset[str]) -> Plan | None:
        with self._lock:
            candidates = [self._candidate(n) for n in sorted(members)]
            epoch = self._last_epoch + 1
        try:
            plan = self._placement(self._manifest, candidates, epoch)
            _check_weights(self._manifest, plan, {c.name: c.mem_budget_mb for c in candidates})
            return plan
        except PlacementError as exc:
            log.error("no placement", error=str(exc))
            return Plan(epoch=epoch, objective=self.settings.objective, stages=(), predicted_ms_per_token=0.0,
                        reason=f"no placement: {exc}"[:512])

    def _publish(self, plan: Plan, members: frozenset[str], reason: str) -> None:
        plan = dataclasses.replace(plan, reason=f"{reason}; {plan.reason}" if plan.reason else reason)
        with self._lock:
            self._last_epoch = max(self._last_epoch, plan.epoch)
            everyone = set(members) | self._planned_for  # nodes that left get an empty assignment
        for node, assignment in assignments(plan, self._manifest_sha, sorted(everyone)).items():
            self._client.publish(topics.NODE_ASSIGN, topics.NODE_ASSIGN.build(self._cluster, node=node),
                                 assignment, wait=5.0)
        self._client.publish(topics.PLAN, topics.PLAN.build(self._cluster), plan, wait=5.0)
        with self._lock:  # with the plan: the old epoch's reports count until here, none after
            self._planned_for, self.plan = frozenset(members), plan
            self._measured.clear()
            self._drift.clear()
            self._in_band.clear()
            self._steady.clear()
        log.info("plan published", epoch=plan.epoch, reason=plan.reason,
                 predicted_ms=round(plan.predicted_ms_per_token, 3),
                 stages=[f"{s.node}:{s.first}-{s.last}" for s in plan.stages])

    def _explain(self) -> None:
        """Re-publish the current plan (same epoch) with the measured stage times."""
        with self._lock:
            plan = self.plan
            if plan is None or not self._measured:
                return
            stages = tuple(dataclasses.replace(s, measured_ms=self._measured[s.node] + max(
                s.predicted_ms - self._predicted_compute(s), 0.0)) if s.node in self._measured else s
                for s in plan.stages)
            times = [s.measured_ms for s in stages if s.measured_ms is not None]
            # one session's ms per token, as predicted_ms_per_token (not the objective's period)
            measured = sum(times) if len(times) == len(stages) else None
            explained = dataclasses.replace(plan, stages=stages, measured_ms_per_token=measured)
            if explained == plan:
                return
            self.plan = explained
        self._client.publish(topics.PLAN, topics.PLAN.build(self._cluster), explained)


def _check_weights(manifest: ModelManifest, plan: Plan, budgets: dict[str, float]) -> None:
    """PlacementError if a stage's weights exceed its node's --mem-budget: the node would
    refuse the assignment (the even split does not look at memory; the MILP does)."""
    for stage in plan.stages:
        budget = budgets.get(stage.node, 0.0)
        need = sum(p.bytes for p in manifest.pieces[stage.first:stage.last + 1]) / 2**20
        if budget and need > budget:
            raise PlacementError(f"{stage.node} would need {need:.1f} MB for pieces {stage.first}-{stage.last}, "
                                 f"its budget is {budget:.1f} MB")


def _membership_reason(before: frozenset[str], now: frozenset[str]) -> str:
    joined, left = sorted(now - before), sorted(before - now)
    parts = ([f"joined: {', '.join(joined)}"] if joined else []) + ([f"left: {', '.join(left)}"] if left else [])
    return "; ".join(parts) or "first plan"


__all__ = ["PlannerService", "PlannerSettings", "Profile"]


def _node_of(topic: str) -> str | None:
    """The node id of a `nodes/{node}/...` topic; None if the topic breaks the id rules."""
    try:
        return str(topics.parse(topic)["node"])
    except topics.TopicError:
        return None
