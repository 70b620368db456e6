"""Problems for the planner's tests, built by fixtures (--import-mode=importlib).

``random_problem(rng, max_pieces, max_devices)``: a random small problem: pieces of mixed
sizes, devices with random speeds, links and budgets, some with the same profile (a
device class), some on the hub (RTT 0, 10^6 Mbps), a few without a budget; about a
quarter of them cannot hold the model at all.
``phone``: a Device from plain numbers. ``layers``: n identical pieces.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from linguamq.planner.cost import CostSettings, Device, PieceCost, Problem
from linguamq.schemas.cluster import Profile

MB = 2**20


def _device(name: str, ms_per_gflop: float, mem_mb: float, up: float = 100.0, down: float = 100.0,
            rtt: float = 10.0) -> Device:
    return Device(name=name, profile=Profile(ms_per_gflop_decode=ms_per_gflop, ms_per_gflop_prefill=ms_per_gflop,
                                             mem_budget_mb=mem_mb, rtt_ms=rtt, uplink_mbps=up, downlink_mbps=down))


@pytest.fixture
def phone() -> Callable[..., Device]:
    return _device


def _layers(n: int, *, mb: float = 100.0, gflop: float = 0.2, act: int = 4096, kv: int = 0) -> tuple[PieceCost, ...]:
    return tuple(PieceCost(name=f"layer.{i}", bytes=int(mb * MB), flops_per_token=int(gflop * 1e9),
                           act_bytes_per_token=act, kv_bytes_per_token=kv) for i in range(n))


@pytest.fixture
def layers() -> Callable[..., tuple[PieceCost, ...]]:
    return _layers


def _batch_cost(rng: np.random.Generator) -> tuple[float, ...]:
    """A measured-looking batch curve for 2, 4, 8 rows: rising, at most one step per row."""
    costs, last = [], 1.0
    for rows in (2, 4, 8):
        last = float(rng.uniform(last, rows))
        costs.append(last)
    return tuple(costs)


def _random_problem(rng: np.random.Generator, max_pieces: int = 12, max_devices: int = 5,
                    batching: bool = False) -> Problem:
    """``batching``: most nodes batch (a random measured curve and row cost each) and 2 to 8 sessions."""
    n, m = int(rng.integers(1, max_pieces + 1)), int(rng.integers(1, max_devices + 1))
    pieces = tuple(PieceCost(name=f"p{i}", bytes=int(rng.integers(1, 400)) * MB,
                             flops_per_token=int(rng.integers(0, 5_000_000_000)),
                             attn_flops_per_position=int(rng.integers(0, 200_000)),
                             act_bytes_per_token=int(rng.integers(8, 1_000_000)),
                             kv_bytes_per_token=int(rng.integers(0, 50_000))) for i in range(n))
    profiles: list[Profile] = []
    for _ in range(m):
        if profiles and rng.random() < 0.2:  # the same device again: a class of two
            profiles.append(profiles[int(rng.integers(len(profiles)))])
            continue
        hub = rng.random() < 0.15
        row_ms = float(rng.uniform(0, 10)) if batching else 0.0  # per session beyond a batch's first
        profiles.append(Profile(
            ms_per_gflop_decode=float(rng.uniform(1, 80)), ms_per_gflop_prefill=1.0,
            mem_budget_mb=0.0 if rng.random() < 0.05 else float(rng.uniform(300, 3000)),
            rtt_ms=0.0 if hub else float(rng.uniform(0.5, 40)), uplink_mbps=1e6 if hub else float(rng.uniform(5, 500)),
            downlink_mbps=1e6 if hub else float(rng.uniform(5, 500)),
            batch_cost=_batch_cost(rng) if batching and rng.random() < 0.8 else (), row_ms=row_ms))
    sessions = int(rng.integers(2, 9)) if batching else int(rng.integers(1, 5))
    settings = CostSettings(max_context=int(rng.integers(16, 4096)), max_sessions=sessions,
                            overhead_mb=float(rng.uniform(0, 200)))
    return Problem(pieces=pieces, devices=tuple(Device(name=f"n{u}", profile=p) for u, p in enumerate(profiles)),
                   settings=settings)


@pytest.fixture
def random_problem() -> Callable[..., Problem]:
    return _random_problem
