"""Placement: which node runs which contiguous pieces. Pure functions, no MQTT.

``Placement`` is the interface the planner fills: given the manifest and the nodes that
can take part, return the stages in pipeline order. ``even_split`` is LinguaLinked's
baseline: pieces divided evenly, in order, across the nodes online. ``planned(...)`` is
the planner's: it solves the placement MILP (milp.py) on the nodes' measured profiles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from linguamq.planner.cost import CostSettings, Device, Objective, Problem, pieces_of
from linguamq.planner.errors import PlannerError
from linguamq.planner.milp import DEFAULT_TIME_LIMIT_S, solve
from linguamq.schemas.cluster import Assignment, Plan, Profile, Segment, Stage
from linguamq.schemas.manifest import ModelManifest

# What ``planned`` assumes of a node that has reported no profile: a mid-range phone on Wi-Fi.
UNKNOWN_PROFILE = Profile(ms_per_gflop_decode=20.0, ms_per_gflop_prefill=7.0, mem_budget_mb=0.0, rtt_ms=10.0,
                          uplink_mbps=50.0, downlink_mbps=100.0)


class PlacementError(ValueError):
    """No placement is possible (no nodes, or the nodes cannot hold the model)."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A node that can take part, as the placement sees it."""

    name: str
    mem_budget_mb: float = 0.0  # 0: unknown / unlimited
    profile: Profile | None = None  # measured (telemetry); None: UNKNOWN_PROFILE for ``planned``


Placement = Callable[[ModelManifest, Sequence[Candidate], int], Plan]


def even_split(manifest: ModelManifest, nodes: Sequence[Candidate], epoch: int) -> Plan:
    """Pieces split into contiguous runs whose sizes differ by at most one, nodes in name order."""
    if not nodes:
        raise PlacementError("no nodes online to place the model on")
    count = len(manifest.pieces)
    ordered = sorted(nodes, key=lambda n: n.name)[:count]
    base, extra = divmod(count, len(ordered))
    stages, first = [], 0
    for i, node in enumerate(ordered):
        size = base + (1 if i < extra else 0)
        stages.append(Stage(node=node.name, first=first, last=first + size - 1, predicted_ms=0.0))
        first += size
    left_out = tuple(n.name for n in sorted(nodes, key=lambda n: n.name)[count:])
    reason = f"even split of {count} pieces over {len(ordered)} nodes"
    if left_out:
        reason += f"; more nodes than pieces: {', '.join(left_out)} idle"
    return Plan(epoch=epoch, objective="even", stages=tuple(stages), predicted_ms_per_token=0.0,
                bottleneck="", reason=reason)


def planned(objective: Objective = "latency", *, settings: CostSettings | None = None,
            time_limit_s: float = DEFAULT_TIME_LIMIT_S) -> Placement:
    """A Placement that solves the MILP; ``settings`` default: the manifest's max_context, 1 session."""

    def place(manifest: ModelManifest, nodes: Sequence[Candidate], epoch: int) -> Plan:
        chosen = settings or CostSettings(max_context=manifest.max_context)
        problem = Problem(pieces=pieces_of(manifest), devices=tuple(device_of(n) for n in nodes), settings=chosen)
        try:
            return solve(problem, objective, time_limit_s=time_limit_s, epoch=epoch)
        except PlannerError as exc:
            raise PlacementError(str(exc)) from exc

    return place


def device_of(node: Candidate) -> Device:
    """The node as the cost model sees it; a budget in its status overrides its profile's."""
    profile = node.profile or UNKNOWN_PROFILE
    if node.mem_budget_mb:
        profile = dataclasses.replace(profile, mem_budget_mb=node.mem_budget_mb)
    return Device(name=node.name, profile=profile)


def assignments(plan: Plan, manifest_sha256: str, nodes: Sequence[str] = ()) -> dict[str, Assignment]:
    """Each node's Assignment for ``plan``; nodes in ``nodes`` but not in the plan get none."""
    segments: dict[str, list[Segment]] = {name: [] for name in nodes}
    for i, stage in enumerate(plan.stages):
        next_piece = plan.stages[i + 1].first if i + 1 < len(plan.stages) else None
        segments.setdefault(stage.node, []).append(Segment(first=stage.first, last=stage.last, next_piece=next_piece))
    last = plan.stages[-1].last if plan.stages else 0
    return {name: Assignment(node=name, epoch=plan.epoch, manifest_sha256=manifest_sha256, segments=tuple(segs),
                             prefetch=_boundaries(segs, last), stages=len(plan.stages))
            for name, segs in segments.items()}


def _boundaries(segments: list[Segment], last: int) -> tuple[int, ...]:
    """The pieces just outside a node's segments: a boundary move then needs no transfer."""
    held = {p for s in segments for p in range(s.first, s.last + 1)}
    around = {p for s in segments for p in (s.first - 1, s.last + 1) if 0 <= p <= last}
    return tuple(sorted(around - held))
