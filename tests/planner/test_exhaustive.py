"""The MILP (Pyomo + glpsol) finds the same optimum as brute force on small problems."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from linguamq.planner import cost, exhaustive
from linguamq.planner.cost import Objective, Problem
from linguamq.planner.errors import PlannerInfeasible
from linguamq.planner.milp import solve
from linguamq.schemas.cluster import Plan

INSTANCES = 320  # per run; objectives alternate
BATCHING_INSTANCES = 150


def plan_value(problem: Problem, plan: Plan, objective: Objective) -> float:
    """The objective of a returned plan, recomputed from its stages with the cost model."""
    by_name = {d.name: d for d in problem.devices}
    times = [cost.stage_ms(problem, by_name[s.node], s.first, s.last) for s in plan.stages]
    assert times == pytest.approx([s.predicted_ms for s in plan.stages], rel=1e-12)
    return cost.objective_value(objective, times, problem.settings.max_sessions, [by_name[s.node].profile for s in plan.stages])


def solve_or_none(problem: Problem, objective: Objective, warm_start: bool) -> Plan | None:
    try:
        return solve(problem, objective, warm_start=warm_start)
    except PlannerInfeasible:
        return None


@pytest.mark.slow
@pytest.mark.parametrize("warm_start", [False, True], ids=["milp-alone", "warm-started"])
def test_milp_equals_brute_force_on_random_small_problems(random_problem: Callable[..., Problem],
                                                          warm_start: bool) -> None:
    rng = np.random.default_rng(20231200388)
    feasible = infeasible = 0
    for k in range(INSTANCES):
        problem = random_problem(rng)
        objective: Objective = ("latency", "throughput")[k % 2]
        best = exhaustive.optimum(problem, objective)
        plan = solve_or_none(problem, objective, warm_start)
        if best is None:
            assert plan is None, f"instance {k}: MILP found a plan where none fits"
            infeasible += 1
            continue
        assert plan is not None, f"instance {k}: MILP says infeasible, brute force found {best.path}"
        assert plan.optimal and plan.gap == 0.0
        got = plan_value(problem, plan, objective)
        assert math.isclose(got, best.value, rel_tol=1e-6), f"instance {k} {objective}: {got} != {best.value}"
        feasible += 1
    assert feasible >= 200 and infeasible >= 30  # both kinds were exercised


@pytest.mark.slow
@pytest.mark.parametrize("warm_start", [False, True], ids=["milp-alone", "warm-started"])
def test_milp_equals_brute_force_when_nodes_batch_several_sessions(random_problem: Callable[..., Problem],
                                                                    warm_start: bool) -> None:
    """Throughput with batching nodes: the period depends on the stage count (one MILP per count)."""
    rng = np.random.default_rng(16)
    feasible = fewer_stages = 0
    for k in range(BATCHING_INSTANCES):
        problem = random_problem(rng, max_pieces=8, batching=True)
        best = exhaustive.optimum(problem, "throughput")
        plan = solve_or_none(problem, "throughput", warm_start)
        if best is None:
            assert plan is None, f"instance {k}: MILP found a plan where none fits"
            continue
        assert plan is not None and plan.optimal and plan.gap == 0.0, f"instance {k}: {best.path}"
        got = plan_value(problem, plan, "throughput")
        assert math.isclose(got, best.value, rel_tol=1e-6), f"instance {k}: {got} != {best.value}"
        feasible += 1
        fewer_stages += len(plan.stages) < min(len(problem.devices), len(problem.pieces), problem.settings.max_sessions)
    assert feasible >= 40 and fewer_stages >= 5  # plans of every stage count were exercised


def test_brute_force_counts_every_ordered_subset_and_composition(random_problem: Callable[..., Problem],
                                                                 phone: Callable, layers: Callable) -> None:
    # 4 pieces, 3 devices that fit anything: sum over k of P(3, k) * C(3, k - 1) = 3 + 18 + 18
    problem = Problem(pieces=layers(4), devices=tuple(phone(f"d{i}", 10 + i, 0) for i in range(3)),
                      settings=cost.CostSettings(max_context=16))
    assert exhaustive.optimum(problem, "latency").plans == 39
