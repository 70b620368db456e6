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

from linguamq.planner import scenario
from linguamq.planner.cost import OBJECTIVES
from linguamq.planner.errors import PlannerError
from linguamq.planner.explain import summary, table
from linguamq.planner.milp import DEFAULT_TIME_LIMIT_S, solve


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
