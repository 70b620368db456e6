"""`linguamq plan SCENARIO.json`: solve a placement offline and explain it.

Prints the stages (node, pieces, predicted ms), ms/token single stream and tokens/s,
the bottleneck, the nodes left out and why, the solve time, optimal or the gap.
Exit 2 with one line on stderr for a bad scenario or when no plan fits.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any

from linguamq.planner import cost, scenario
from linguamq.planner.cost import OBJECTIVES, Problem
from linguamq.planner.errors import PlannerError
from linguamq.planner.milp import DEFAULT_TIME_LIMIT_S, solve
from linguamq.schemas.cluster import Plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("scenario", metavar="SCENARIO.json",
                        help="model (manifest path or inline pieces) and devices; see examples/")
    parser.add_argument("--objective", choices=OBJECTIVES, default="latency",
                        help="latency: fastest single stream (default); throughput: most tokens/s with "
                             "max_sessions sessions in flight")
    parser.add_argument("--time-limit", type=_positive, default=DEFAULT_TIME_LIMIT_S, metavar="S",
                        help=f"stop the search after S seconds and report the gap (default {DEFAULT_TIME_LIMIT_S:g})")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")


def run(args: argparse.Namespace) -> int:
    logging.getLogger("pyomo").setLevel(logging.WARNING)  # its DEBUG lines print whole models
    try:
        problem = scenario.load(args.scenario)
        plan = solve(problem, args.objective, time_limit_s=args.time_limit)
    except PlannerError as exc:
        print(f"linguamq plan: error: {exc}", file=sys.stderr)
        return 2
    report = summary(problem, plan)
    print(json.dumps(report) if args.json else table(args.scenario, problem, report))
    return 0


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def summary(problem: Problem, plan: Plan) -> dict[str, Any]:
    """What the table shows, as one JSON object (the Plan itself under "plan")."""
    times = [s.predicted_ms for s in plan.stages]
    period = cost.objective_value("throughput", times, problem.settings.max_sessions)
    return {
        "objective": plan.objective,
        "ms_per_token": plan.predicted_ms_per_token,
        "tokens_per_s": 1000 / plan.predicted_ms_per_token,
        "pipelined_ms_per_token": period,
        "pipelined_tokens_per_s": 1000 / period,
        "max_sessions": problem.settings.max_sessions,
        "stages": [stage_row(problem, stage) for stage in plan.stages],
        "bottleneck": plan.bottleneck,
        "left_out": [lo.to_dict() for lo in plan.left_out],
        "solve_s": plan.solve_s,
        "optimal": plan.optimal,
        "gap": plan.gap,
        "reason": plan.reason,
        "plan": plan.to_dict(),
    }


def stage_row(problem: Problem, stage: Any) -> dict[str, Any]:
    device = next(d for d in problem.devices if d.name == stage.node)
    return {"node": stage.node, "first": stage.first, "last": stage.last, "predicted_ms": stage.predicted_ms,
            "compute_ms": cost.compute_ms(problem, device, stage.first, stage.last),
            "link_ms": cost.link_ms(problem, device, stage.first, stage.last),
            "mem_mb": cost.need_mb(problem, stage.first, stage.last), "mem_budget_mb": device.profile.mem_budget_mb}


def table(path: str, problem: Problem, r: dict[str, Any]) -> str:
    s = problem.settings
    how = "optimal" if r["optimal"] else f"time limit reached, gap {r['gap']:.2%}"
    lines = [f"{path}: {len(problem.pieces)} pieces, {len(problem.devices)} devices, context {s.max_context}, "
             f"{s.max_sessions} session(s)",
             f"objective {r['objective']}: {how}, solved in {r['solve_s']:.2f} s", "",
             f"{'stage':<6}{'node':<16}{'pieces':>10}{'compute ms':>12}{'link ms':>10}{'stage ms':>10}"
             f"{'memory MB':>18}"]
    for i, row in enumerate(r["stages"]):
        budget = f"{row['mem_budget_mb']:.0f}" if row["mem_budget_mb"] else "-"
        lines.append(f"{i + 1:<6}{row['node']:<16}{row['first']:>5}..{row['last']:<3}{row['compute_ms']:>12.2f}"
                     f"{row['link_ms']:>10.2f}{row['predicted_ms']:>10.2f}{row['mem_mb']:>11.0f} / {budget:<5}")
    lines += ["", f"predicted {r['ms_per_token']:.2f} ms/token single stream ({r['tokens_per_s']:.2f} tokens/s); "
                  f"pipelined with {r['max_sessions']} session(s) in flight: {r['pipelined_tokens_per_s']:.2f} tokens/s",
              f"bottleneck: {_bottleneck(r)}"]
    if r["left_out"]:
        lines += ["left out:"] + [f"  {lo['node']}: {lo['why']}" for lo in r["left_out"]]
    return "\n".join(lines)


def _bottleneck(r: dict[str, Any]) -> str:
    row = max(r["stages"], key=lambda row: row["predicted_ms"])
    kind = "compute" if row["compute_ms"] >= row["link_ms"] else "link"
    text = f"{row['node']} (pieces {row['first']}..{row['last']}, {row['predicted_ms']:.2f} ms, {kind}-bound)"
    if r["pipelined_ms_per_token"] > row["predicted_ms"]:
        text += (f"; pipelined, the {r['max_sessions']} session(s) in flight are the limit "
                 f"({r['ms_per_token']:.2f} ms / {r['max_sessions']} per token)")
    return text
