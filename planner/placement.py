"""Placement: which node runs which contiguous pieces. Pure functions, no MQTT.

``Placement`` is the interface the planner fills: given the manifest and the nodes that
can take part, return the stages in pipeline order. ``even_split`` is LinguaLinked's
baseline: pieces divided evenly, in order, across the nodes online.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

from linguamq.schemas.cluster import Assignment, Plan, Segment, Stage
from linguamq.schemas.manifest import ModelManifest


class PlacementError(ValueError):
    """No placement is possible (no nodes, or the nodes cannot hold the model)."""


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A node that can take part, as the placement sees it."""

    name: str
    mem_budget_mb: float = 0.0  # 0: unknown / unlimited


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


def assignments(plan: Plan, manifest_sha256: str, nodes: Sequence[str] = ()) -> dict[str, Assignment]:
    """Each node's Assignment for ``plan``; nodes in ``nodes`` but not in the plan get none."""
    segments: dict[str, list[Segment]] = {name: [] for name in nodes}
    for i, stage in enumerate(plan.stages):
        next_piece = plan.stages[i + 1].first if i + 1 < len(plan.stages) else None
        segments.setdefault(stage.node, []).append(Segment(first=stage.first, last=stage.last, next_piece=next_piece))
    return {name: Assignment(node=name, epoch=plan.epoch, manifest_sha256=manifest_sha256, segments=tuple(segs))
            for name, segs in segments.items()}
