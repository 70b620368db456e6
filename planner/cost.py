"""The planner's cost model: what a stage costs in time and memory. Pure functions.

A stage is one node running the contiguous pieces ``first..last``. Units: ms, bytes,
MB = 2**20 bytes (as `mem_budget_mb` everywhere), Mbps = 1e6 bit/s, GFLOP = 1e9 FLOPs.

Time of a stage, per decoded token (``stage_ms``)::

    compute  = sum(flops_per_token + context * attn_flops_per_position) / 1e9 * ms_per_gflop
    link     = rtt_ms + in_bytes * 8 / (downlink_mbps * 1e3) + out_bytes * 8 / (uplink_mbps * 1e3)
    stage_ms = compute + link

Every hop goes node -> broker -> node and costs ``rtt/2 + bytes / uplink`` of the sender
plus ``rtt/2 + bytes / downlink`` of the receiver; each half is charged to the stage that
pays it, so a stage pays its own RTT once (half receiving, half sending), its downlink
for its input and its uplink for its output. ``in_bytes`` is the previous piece's
``act_bytes_per_token`` (the head's token, ``token_bytes``, for piece 0); ``out_bytes`` is
the last piece's ``act_bytes_per_token`` (the sampled token, ``token_bytes``, for the
tail, which samples). The head that sends the input and reads the token is on the hub
(RTT 0, unlimited bandwidth) and pays nothing; a node on the hub is near free the same way.

Objectives (``objective_value``), over the stages of a plan:
- ``latency``: ``sum(stage_ms)``, the single-stream ms per token.
- ``throughput``: the pipeline period per token of ``max_sessions`` sessions in flight,
  each with one token in flight (``pipelined_ms``); tokens/s over all sessions = 1000 /
  period. Nodes that run one session a call: ``max(max(stage_ms), sum(stage_ms) / max_sessions)``.
  Nodes that batch (their profile's ``batch_cost``, measured) run the sessions of a plan of
  k stages as ``min(k, sessions)`` groups, one batch per group a step, each stage's time
  times its batch factor and each session beyond the first adding the node's ``row_ms``
  (its messages: ``Profile.batch_ms``): ``max(sum(batch_ms), groups * max(batch_ms)) /
  sessions``. Not linear in the stage count, so the MILP solves once per count (milp.py).

Memory of a stage (``need_mb``)::

    need = overhead_factor * weights + kv_bytes_per_token * max_context * max_sessions
           + overhead_mb   (per node that takes part)

A budget of 0 means no limit. Prefill is not modelled: plans are for decoding, where a
session spends its time; the profile's prefill speed is carried for later use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Literal

import numpy as np

from linguamq.schemas.cluster import Profile
from linguamq.schemas.manifest import ModelManifest

Objective = Literal["latency", "throughput"]
OBJECTIVES: tuple[Objective, ...] = ("latency", "throughput")
MB = 2**20
TOKEN_BYTES = 8  # an int64 token id: the head's input to stage 0, and the tail's output


@dataclasses.dataclass(frozen=True, kw_only=True)
class PieceCost:
    """What the cost model reads of a piece (a PieceSpec, or a scenario's inline piece)."""

    name: str = ""
    bytes: int
    flops_per_token: int
    attn_flops_per_position: int = 0
    act_bytes_per_token: int
    kv_bytes_per_token: int = 0


@dataclasses.dataclass(frozen=True)
class Device:
    name: str
    profile: Profile


@dataclasses.dataclass(frozen=True, kw_only=True)
class CostSettings:
    max_context: int  # KV memory is reserved for this many tokens per session
    max_sessions: int = 1  # sessions whose KV every node keeps; also those in flight
    context: int | None = None  # cached positions a modelled decode step attends to (None: max_context)
    overhead_factor: float = 1.3  # runtime memory per weight byte (the run-local RSS target)
    overhead_mb: float = 200.0  # runtime memory per node that takes part
    token_bytes: int = TOKEN_BYTES

    @property
    def attn_positions(self) -> int:
        return self.max_context if self.context is None else self.context


@dataclasses.dataclass(frozen=True)
class Problem:
    """Everything a solve needs: the pieces, the nodes that may take part, the settings."""

    pieces: tuple[PieceCost, ...]
    devices: tuple[Device, ...]
    settings: CostSettings

    def __post_init__(self) -> None:
        names = [d.name for d in self.devices]
        if len(set(names)) != len(names):
            raise ValueError(f"device names must be unique: {sorted(names)}")


def pieces_of(manifest: ModelManifest) -> tuple[PieceCost, ...]:
    return tuple(PieceCost(name=p.name, bytes=p.bytes, flops_per_token=p.flops_per_token,
                           attn_flops_per_position=p.attn_flops_per_position,
                           act_bytes_per_token=p.act_bytes_per_token, kv_bytes_per_token=p.kv_bytes_per_token)
                 for p in manifest.pieces)


# --- per piece -------------------------------------------------------------------------

def piece_gflop(piece: PieceCost, settings: CostSettings) -> float:
    return (piece.flops_per_token + settings.attn_positions * piece.attn_flops_per_position) / 1e9


def piece_weight_bytes(piece: PieceCost, settings: CostSettings) -> float:
    """Memory a piece needs, the per-node overhead excluded."""
    kv = piece.kv_bytes_per_token * settings.max_context * settings.max_sessions
    return settings.overhead_factor * piece.bytes + kv


def in_bytes(pieces: Sequence[PieceCost], first: int, settings: CostSettings) -> int:
    return settings.token_bytes if first == 0 else pieces[first - 1].act_bytes_per_token


def out_bytes(pieces: Sequence[PieceCost], last: int, settings: CostSettings) -> int:
    return settings.token_bytes if last == len(pieces) - 1 else pieces[last].act_bytes_per_token


def transfer_ms(num_bytes: float, mbps: float) -> float:
    return num_bytes * 8 / (mbps * 1e3)


# --- per stage -------------------------------------------------------------------------

def compute_ms(problem: Problem, device: Device, first: int, last: int) -> float:
    gflop = sum(piece_gflop(p, problem.settings) for p in problem.pieces[first:last + 1])
    return gflop * device.profile.ms_per_gflop_decode


def link_ms(problem: Problem, device: Device, first: int, last: int) -> float:
    prof, s = device.profile, problem.settings
    return (prof.rtt_ms + transfer_ms(in_bytes(problem.pieces, first, s), prof.downlink_mbps)
            + transfer_ms(out_bytes(problem.pieces, last, s), prof.uplink_mbps))


def stage_ms(problem: Problem, device: Device, first: int, last: int) -> float:
    return compute_ms(problem, device, first, last) + link_ms(problem, device, first, last)


def need_mb(problem: Problem, first: int, last: int) -> float:
    s = problem.settings
    return sum(piece_weight_bytes(p, s) for p in problem.pieces[first:last + 1]) / MB + s.overhead_mb


def share_mb(manifest: ModelManifest, share: float, max_sessions: int = 1) -> float:
    """A node memory budget that holds ``share`` of the whole model as this model counts
    memory (per-node overhead included once): below 1, no single node can hold it."""
    settings = CostSettings(max_context=manifest.max_context, max_sessions=max_sessions)
    whole = need_mb(Problem(pieces=pieces_of(manifest), devices=(), settings=settings), 0, len(manifest.pieces) - 1)
    return settings.overhead_mb + (whole - settings.overhead_mb) * share


def fits(problem: Problem, device: Device, first: int, last: int) -> bool:
    budget = device.profile.mem_budget_mb
    return budget == 0 or need_mb(problem, first, last) <= budget  # 0: no budget


# --- per plan --------------------------------------------------------------------------

def objective_value(objective: Objective, stage_times: Sequence[float], max_sessions: int,
                    profiles: Sequence[Profile]) -> float:
    """``latency``: ms per token of one session; ``throughput``: ``pipelined_ms`` of
    ``max_sessions`` sessions on nodes of ``profiles``."""
    if objective == "latency":
        return sum(stage_times)
    return pipelined_ms(stage_times, profiles, max_sessions)


def batch_shape(sessions: int, stages: int) -> tuple[int, float]:
    """(groups, rows): ``sessions`` in flight on ``stages`` stages move as ``groups`` groups
    of ``rows`` sessions each (a node batches at most ``ceil(sessions / stages)``)."""
    groups = max(1, min(sessions, stages))
    return groups, sessions / groups


def pipelined_ms(stage_times: Sequence[float], profiles: Sequence[Profile], sessions: int) -> float:
    """ms per token of ``sessions`` in flight on stages of ``stage_times`` run by nodes of
    ``profiles``: each group (``batch_shape``) is one batch per stage; the period is one
    group's trip or the busiest stage serving every group, whichever is longer, over the
    sessions. One session a call (no batch_cost), this is
    ``max(max(stage_times), sum(stage_times) / sessions)``."""
    groups, rows = batch_shape(sessions, len(stage_times))
    batch = [p.batch_ms(t, rows) for t, p in zip(stage_times, profiles)]
    return max(sum(batch), groups * max(batch)) / sessions


# --- tables for the solvers ----------------------------------------------------------

def _span(prefix: np.ndarray) -> np.ndarray:
    """(a, b) -> the sum over pieces a..b, from prefix sums."""
    return prefix[None, 1:] - prefix[:-1, None]


def stage_table(problem: Problem) -> np.ndarray:
    """``table[u, a, b]``: stage_ms of device u on pieces a..b, inf where they do not fit it
    or b < a: the numbers of ``stage_ms`` and ``fits``, from prefix sums.  (devices, pieces, pieces)"""
    s, pieces = problem.settings, problem.pieces
    n = len(pieces)
    gflop = np.concatenate([[0.0], np.cumsum([piece_gflop(p, s) for p in pieces])])
    mem = np.concatenate([[0.0], np.cumsum([piece_weight_bytes(p, s) for p in pieces])])
    ins = np.array([in_bytes(pieces, a, s) for a in range(n)], dtype=float)
    outs = np.array([out_bytes(pieces, b, s) for b in range(n)], dtype=float)
    upper = np.triu(np.ones((n, n), dtype=bool))
    need = _span(mem) / MB + s.overhead_mb
    stage = np.full((len(problem.devices), n, n), np.inf)
    for u, device in enumerate(problem.devices):
        prof = device.profile
        time = (_span(gflop) * prof.ms_per_gflop_decode + prof.rtt_ms
                + (ins * 8 / (prof.downlink_mbps * 1e3))[:, None] + (outs * 8 / (prof.uplink_mbps * 1e3))[None, :])
        ok = upper & ((prof.mem_budget_mb == 0) | (need <= prof.mem_budget_mb))
        stage[u][ok] = time[ok]
    return stage
