"""LinguaLinked's baseline placement and the assignments derived from a plan."""

from __future__ import annotations

import dataclasses

import pytest

from linguamq.planner.placement import Candidate, PlacementError, assignments, even_split
from linguamq.schemas.examples import MANIFEST


def manifest_with(pieces: int):
    layers = pieces - 2
    base = MANIFEST.pieces
    made = [dataclasses.replace(base[0])]
    made += [dataclasses.replace(base[1], index=i + 1, name=f"layer.{i}") for i in range(layers)]
    made += [dataclasses.replace(base[-1], index=pieces - 1)]
    return dataclasses.replace(MANIFEST, num_layers=layers, pieces=tuple(made))


@pytest.mark.parametrize(("pieces", "nodes", "sizes"), [(4, 3, [2, 1, 1]), (14, 3, [5, 5, 4]), (5, 5, [1] * 5),
                                                        (3, 5, [1, 1, 1]), (7, 1, [7])])
def test_even_split_covers_every_piece_once_in_order(pieces, nodes, sizes) -> None:
    plan = even_split(manifest_with(pieces), [Candidate(f"n{i}") for i in range(nodes)], epoch=3)
    assert [s.last - s.first + 1 for s in plan.stages] == sizes
    assert plan.stages[0].first == 0 and plan.stages[-1].last == pieces - 1
    assert all(a.last + 1 == b.first for a, b in zip(plan.stages, plan.stages[1:]))
    assert plan.epoch == 3 and plan.objective == "even"


def test_even_split_needs_a_node() -> None:
    with pytest.raises(PlacementError, match="no nodes"):
        even_split(manifest_with(4), [], epoch=1)


def test_assignments_chain_stages_and_empty_the_nodes_that_left() -> None:
    plan = even_split(manifest_with(6), [Candidate("a"), Candidate("b")], epoch=2)
    out = assignments(plan, "f" * 64, nodes=["a", "b", "gone"])
    assert [(s.first, s.last, s.next_piece) for s in out["a"].segments] == [(0, 2, 3)]
    assert [(s.first, s.last, s.next_piece) for s in out["b"].segments] == [(3, 5, None)]
    assert out["gone"].segments == () and {a.epoch for a in out.values()} == {2}
