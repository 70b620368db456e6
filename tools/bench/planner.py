"""`linguamq bench planner`: how long the placement MILP takes, and whether it proves optimality.

Two sizes, both objectives, ``--seeds`` random clusters each (medians reported):
- 34 pieces x 8 devices: a 7B Llama in int8 (embed, 32 layers, head). Target: optimal,
  median solve within 1 s.
- 130 pieces x 16 devices: a 64-layer, hidden-5120 model in int8 split into attention
  and MLP pieces (embed, 64 x (attn, mlp), head), so pieces differ. Target: a plan
  within the 10 s time limit, the gap to the best bound reported when not proven optimal.

Devices are drawn from a catalogue (desktop, laptop, tablet, phones, Raspberry Pis, and
the hub itself: RTT 0, 10 Gbps) with +-25% jitter; memory budgets are scaled so that
together they offer about 1.6 x what the model needs. 4 sessions, context 1024.
Solve time is ``Plan.solve_s``: heuristic warm start, Pyomo model, glpsol, all of it.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
from typing import Any

import numpy as np

from linguamq.planner.cost import OBJECTIVES, CostSettings, Device, Objective, PieceCost, Problem, need_mb
from linguamq.planner.milp import find_glpsol, solve
from linguamq.schemas.cluster import Profile

TARGET_S = {"34x8": 1.0, "130x16": 10.0}
# name: (ms_per_gflop, mem_mb, uplink_mbps, downlink_mbps, rtt_ms)
CATALOGUE = {
    "hub": (2.5, 4096, 10_000, 10_000, 0.0),
    "desktop": (3.0, 6144, 900, 900, 1.0),
    "laptop": (6.0, 4096, 200, 300, 4.0),
    "tablet": (18.0, 3072, 50, 100, 10.0),
    "phone-hi": (12.0, 4096, 60, 120, 8.0),
    "phone-mid": (25.0, 2048, 40, 80, 12.0),
    "pi5": (30.0, 3072, 300, 300, 2.0),
    "pi4": (60.0, 2048, 90, 90, 2.0),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seeds", type=int, default=5, metavar="N", help="random clusters per size (default 5)")
    parser.add_argument("--time-limit", type=float, default=10.0, metavar="S", help="per solve (default 10)")


def run(args: argparse.Namespace) -> int:
    logging.getLogger("pyomo").setLevel(logging.WARNING)
    solve(problem("34x8", 0), "latency")  # warm-up: the first solve also imports Pyomo (about 0.5 s)
    rows = [measure(size, objective, args) for size in TARGET_S for objective in OBJECTIVES]
    report = {"bench": "planner", "python": platform.python_version(), "machine": platform.machine(),
              "glpsol": find_glpsol().path, "seeds": args.seeds, "time_limit_s": args.time_limit, "results": rows}
    print(json.dumps(report) if args.json else table(report))
    return 0


def measure(size: str, objective: Objective, args: argparse.Namespace) -> dict[str, Any]:
    runs = []
    for seed in range(args.seeds):
        plan = solve(problem(size, seed), objective, time_limit_s=args.time_limit)
        runs.append({"seed": seed, "solve_s": plan.solve_s, "optimal": plan.optimal, "gap": plan.gap,
                     "stages": len(plan.stages), "ms_per_token": plan.predicted_ms_per_token})
    times = [r["solve_s"] for r in runs]
    return {"size": size, "objective": objective, "median_s": statistics.median(times), "max_s": max(times),
            "optimal": sum(r["optimal"] for r in runs), "runs": len(runs),
            "median_gap": statistics.median(r["gap"] for r in runs), "max_gap": max(r["gap"] for r in runs),
            "median_stages": statistics.median(r["stages"] for r in runs), "target_s": TARGET_S[size],
            "meets_target": statistics.median(times) <= TARGET_S[size]
            and (size != "34x8" or all(r["optimal"] for r in runs)), "seeds": runs}


def table(report: dict[str, Any]) -> str:
    lines = [f"planner bench: {report['seeds']} seeds per row, time limit {report['time_limit_s']:g} s, "
             f"glpsol {report['glpsol']}",
             f"{'size':<8}{'objective':<12}{'median s':>10}{'max s':>8}{'optimal':>9}{'median gap':>12}"
             f"{'max gap':>9}{'stages':>8}  target"]
    for r in report["results"]:
        lines.append(f"{r['size']:<8}{r['objective']:<12}{r['median_s']:>10.2f}{r['max_s']:>8.2f}"
                     f"{r['optimal']:>6}/{r['runs']:<2}{r['median_gap']:>12.2%}{r['max_gap']:>9.2%}"
                     f"{r['median_stages']:>8g}  <= {r['target_s']:g} s: {'met' if r['meets_target'] else 'MISSED'}")
    return "\n".join(lines)


# --- instances -------------------------------------------------------------------------

def problem(size: str, seed: int) -> Problem:
    pieces = llama_7b_int8() if size == "34x8" else split_64_layers_int8()
    settings = CostSettings(max_context=1024, max_sessions=4)
    n_devices = 8 if size == "34x8" else 16
    draft = Problem(pieces=pieces, devices=(), settings=settings)
    return Problem(pieces=pieces, devices=devices(np.random.default_rng(seed), n_devices, draft), settings=settings)


def devices(rng: np.random.Generator, count: int, draft: Problem) -> tuple[Device, ...]:
    kinds = ["hub"] + list(rng.choice([k for k in CATALOGUE if k != "hub"], size=count - 1))
    raw = [tuple(v * rng.uniform(0.75, 1.25) for v in CATALOGUE[k]) for k in kinds]
    need = need_mb(draft, 0, len(draft.pieces) - 1) + draft.settings.overhead_mb * (count - 1)
    scale = 1.6 * need / sum(r[1] for r in raw)
    return tuple(Device(name=f"{kind}-{i}", profile=Profile(
        ms_per_gflop_decode=ms, ms_per_gflop_prefill=ms / 3, mem_budget_mb=round(mem * scale), uplink_mbps=up,
        downlink_mbps=down, rtt_ms=rtt)) for i, (kind, (ms, mem, up, down, rtt)) in enumerate(zip(kinds, raw)))


def llama_7b_int8() -> tuple[PieceCost, ...]:
    h, inter, vocab = 4096, 11008, 32000
    layer = 4 * h * h + 3 * h * inter
    return (PieceCost(name="embed", bytes=vocab * h, flops_per_token=0, act_bytes_per_token=2 * h),
            *(PieceCost(name=f"layer.{i}", bytes=layer, flops_per_token=2 * layer, attn_flops_per_position=4 * h,
                        act_bytes_per_token=2 * h, kv_bytes_per_token=2 * h * 2) for i in range(32)),
            PieceCost(name="head", bytes=vocab * h, flops_per_token=2 * vocab * h, act_bytes_per_token=4 * vocab))


def split_64_layers_int8() -> tuple[PieceCost, ...]:
    h, kv, inter, vocab = 5120, 1024, 27648, 152064
    attn, mlp = 2 * h * h + 2 * h * kv, 3 * h * inter
    body = []
    for i in range(64):
        body.append(PieceCost(name=f"attn.{i}", bytes=attn, flops_per_token=2 * attn, attn_flops_per_position=4 * h,
                              act_bytes_per_token=2 * h, kv_bytes_per_token=2 * kv * 2))
        body.append(PieceCost(name=f"mlp.{i}", bytes=mlp, flops_per_token=2 * mlp, act_bytes_per_token=2 * h))
    return (PieceCost(name="embed", bytes=vocab * h, flops_per_token=0, act_bytes_per_token=2 * h), *body,
            PieceCost(name="head", bytes=vocab * h, flops_per_token=2 * vocab * h, act_bytes_per_token=4 * vocab))
