"""Brute force: the optimum of a small problem, to check the MILP against.

Every ordered subset of the devices x every composition of the pieces into contiguous
segments, one per device in that order, costed with the same cost model (``cost``),
scalar functions only (no tables, no pruning by value). A segment that does not fit its
device ends that branch: memory grows with the segment, so no longer one fits either.
Sizes: 12 pieces and 5 devices make about 63 000 plans.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from linguamq.planner import cost
from linguamq.planner.cost import Objective, Problem

MAX_PIECES, MAX_DEVICES = 12, 5

Path_ = tuple[tuple[int, int, int], ...]  # (device, first, last) in piece order


@dataclasses.dataclass(frozen=True)
class Optimum:
    value: float
    path: Path_
    plans: int  # feasible plans enumerated


def optimum(problem: Problem, objective: Objective) -> Optimum | None:
    """The best plan, or None when no plan fits."""
    n, m = len(problem.pieces), len(problem.devices)
    if n > MAX_PIECES or m > MAX_DEVICES:
        raise ValueError(f"exhaustive search is for <= {MAX_PIECES} pieces and <= {MAX_DEVICES} devices")
    stage = _stage_cache(problem)
    best: list[Optimum | None] = [None]
    plans = [0]

    def extend(first: int, path: Path_, times: tuple[float, ...]) -> None:
        if first == n:
            plans[0] += 1
            value = cost.objective_value(objective, times, problem.settings.max_sessions,
                                         [problem.devices[u].profile for u, _, _ in path])
            if best[0] is None or value < best[0].value:
                best[0] = Optimum(value=value, path=path, plans=0)
            return
        used = {u for u, _, _ in path}
        for u in (u for u in range(m) if u not in used):
            for last in range(first, n):
                t = stage(u, first, last)
                if t is None:
                    break
                extend(last + 1, path + ((u, first, last),), times + (t,))

    extend(0, (), ())
    return None if best[0] is None else dataclasses.replace(best[0], plans=plans[0])


def _stage_cache(problem: Problem) -> Callable[[int, int, int], float | None]:
    """stage_ms of (device, first, last), None where it does not fit; each computed once."""
    memo: dict[tuple[int, int, int], float | None] = {}

    def stage(u: int, first: int, last: int) -> float | None:
        key = (u, first, last)
        if key not in memo:
            device = problem.devices[u]
            memo[key] = (cost.stage_ms(problem, device, first, last)
                         if cost.fits(problem, device, first, last) else None)
        return memo[key]

    return stage
