"""A plan explained to a person: per-stage compute, link and memory, the bottleneck, and why
nodes were left out (`linguamq plan` prints it; ``summary`` is also its ``--json``)."""

from __future__ import annotations

from typing import Any

from linguamq.planner import cost
from linguamq.planner.cost import Problem
from linguamq.schemas.cluster import Plan


def summary(problem: Problem, plan: Plan) -> dict[str, Any]:
    """What the table shows, as one JSON object (the Plan itself under "plan")."""
    times = [s.predicted_ms for s in plan.stages]
    profiles = [next(d.profile for d in problem.devices if d.name == s.node) for s in plan.stages]
    period = cost.pipelined_ms(times, profiles, problem.settings.max_sessions)
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
