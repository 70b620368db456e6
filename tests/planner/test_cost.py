"""The cost model, checked against numbers worked out by hand."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from linguamq.planner import cost
from linguamq.planner.cost import CostSettings, PieceCost, Problem

MB = 2**20
EMBED = PieceCost(name="embed", bytes=100 * MB, flops_per_token=0, act_bytes_per_token=4000)
LAYER = PieceCost(name="layer", bytes=50 * MB, flops_per_token=500_000_000, attn_flops_per_position=1000,
                  act_bytes_per_token=4000, kv_bytes_per_token=512)
HEAD = PieceCost(name="head", bytes=100 * MB, flops_per_token=250_000_000, act_bytes_per_token=128_000)
PIECES = (EMBED, LAYER, LAYER, HEAD)
SETTINGS = CostSettings(max_context=1000, max_sessions=2, overhead_factor=1.5, overhead_mb=10.0)


@pytest.fixture
def problem(phone: Callable) -> Problem:
    devices = (phone("phone", 20.0, 400, up=10.0, down=40.0, rtt=8.0),
               phone("hub", 2.0, 0, up=1e6, down=1e6, rtt=0.0))
    return Problem(pieces=PIECES, devices=devices, settings=SETTINGS)


def test_a_stage_pays_its_compute_its_rtt_its_input_downlink_and_its_output_uplink(problem: Problem) -> None:
    phone = problem.devices[0]
    # pieces 1..2: 2 x (0.5 GFLOP + 1000 positions x 1000 FLOP) = 1.002 GFLOP at 20 ms/GFLOP
    assert cost.compute_ms(problem, phone, 1, 2) == pytest.approx(20.04)
    # in: embed's 4000 B over 40 Mbps = 0.8 ms; out: layer's 4000 B over 10 Mbps = 3.2 ms; + RTT 8
    assert cost.link_ms(problem, phone, 1, 2) == pytest.approx(0.8 + 3.2 + 8.0)
    assert cost.stage_ms(problem, phone, 1, 2) == pytest.approx(20.04 + 12.0)


def test_the_head_sends_a_token_in_and_the_tail_sends_a_token_back(problem: Problem) -> None:
    phone = problem.devices[0]
    # the whole model on the phone: 8 B in over 40 Mbps, 8 B out over 10 Mbps (not the logits)
    assert cost.link_ms(problem, phone, 0, 3) == pytest.approx(8 * 8 / 40e3 + 8 * 8 / 10e3 + 8.0)


def test_a_node_on_the_hub_has_a_near_free_link(problem: Problem) -> None:
    hub = problem.devices[1]
    assert cost.link_ms(problem, hub, 1, 2) < 1e-4
    assert cost.stage_ms(problem, hub, 1, 2) == pytest.approx(1.002 * 2.0, rel=1e-4)


def test_memory_is_weights_with_overhead_plus_kv_for_every_session_plus_a_constant(problem: Problem) -> None:
    # 1.5 x 100 MB (weights) + 512 B x 1000 tokens x 2 sessions (KV) + 10 MB
    assert cost.need_mb(problem, 1, 2) == pytest.approx(1.5 * 100 + 2 * 512 * 1000 * 2 / MB + 10)
    assert cost.fits(problem, problem.devices[0], 1, 2)
    assert not cost.fits(problem, problem.devices[0], 0, 3)  # 1.5 x 300 MB + KV + 10 MB > 400 MB
    assert cost.fits(problem, problem.devices[1], 0, 3)  # 0: no budget


def test_latency_adds_the_stages_and_throughput_is_the_slowest_stage_or_the_sessions_limit() -> None:
    assert cost.objective_value("latency", [10.0, 30.0, 20.0], max_sessions=4, profiles=[_profile()] * 3) == 60.0
    assert cost.objective_value("throughput", [10.0, 30.0, 20.0], max_sessions=4, profiles=[_profile()] * 3) == 30.0  # slowest stage
    assert cost.objective_value("throughput", [10.0, 30.0, 20.0], max_sessions=1, profiles=[_profile()] * 3) == 60.0  # one token in flight
    assert cost.objective_value("throughput", [10.0, 30.0, 20.0], max_sessions=3, profiles=[_profile()] * 3) == 30.0


def test_context_sets_the_attention_cost_of_a_decode_step(problem: Problem) -> None:
    short = Problem(pieces=PIECES, devices=problem.devices, settings=CostSettings(max_context=1000, context=0))
    assert cost.compute_ms(short, problem.devices[0], 1, 1) == pytest.approx(0.5 * 20)


def test_the_solver_tables_hold_the_same_numbers_and_mark_what_does_not_fit(problem: Problem) -> None:
    table = cost.stage_table(problem)
    for u, device in enumerate(problem.devices):
        for a in range(4):
            for b in range(a, 4):
                expected = cost.stage_ms(problem, device, a, b) if cost.fits(problem, device, a, b) else np.inf
                assert table[u, a, b] == pytest.approx(expected, rel=1e-12)
    assert np.isinf(table[:, 2, 1]).all()  # last before first


def _profile(batch_cost: tuple[float, ...] = (), row_ms: float = 0.0):
    from linguamq.schemas.cluster import Profile
    return Profile(ms_per_gflop_decode=1.0, ms_per_gflop_prefill=1.0, mem_budget_mb=0.0, rtt_ms=0.0,
                   uplink_mbps=1.0, downlink_mbps=1.0, batch_cost=batch_cost, row_ms=row_ms)


def test_a_batch_costs_what_the_profile_measured_and_n_steps_without_it() -> None:
    measured = _profile((1.1, 1.3, 1.9))  # 2, 4 and 8 rows
    assert [measured.batch_factor(r) for r in (1, 2, 3, 4, 8)] == pytest.approx([1.0, 1.1, 1.2, 1.3, 1.9])
    assert measured.batch_factor(16) == pytest.approx(1.9 + 8 * 0.6 / 4)  # the last slope beyond
    assert [_profile().batch_factor(r) for r in (1, 2, 8)] == [1.0, 2.0, 8.0]  # one session a call


def test_sessions_pipelined_in_batches_are_predicted_per_group_and_as_before_without_batches() -> None:
    times = [10.0, 20.0, 5.0]
    rng = np.random.default_rng(2)
    for _ in range(50):  # without batching, the throughput objective's period
        t, k = list(rng.uniform(1, 30, 3)), int(rng.integers(1, 12))
        assert cost.pipelined_ms(t, [_profile()] * 3, k) == pytest.approx(max(max(t), sum(t) / k))
    # 8 sessions on 3 stages that batch: groups of 8/3, each stage runs a batch per group
    batching = [_profile((1.1, 1.3, 1.9))] * 3
    f = 1.1 + (8 / 3 - 2) / 2 * 0.2  # between the 2- and 4-row points
    assert cost.pipelined_ms(times, batching, 8) == pytest.approx(max(35 * f, 3 * 20 * f) / 8)
    assert cost.pipelined_ms(times, batching, 8) < max(times)  # what 8 sessions one a call would get
    assert cost.pipelined_ms(times, batching, 3) == max(times)  # one each: nothing batches
    assert cost.objective_value("throughput", times, 8, batching) == cost.pipelined_ms(times, batching, 8)


def test_each_session_beyond_a_batchs_first_adds_its_messages() -> None:
    """A batch saves compute, not the messages: every session of it is received, decoded,
    sampled, encoded and sent on its own (Profile.row_ms, measured by the node)."""
    rows = _profile((1.1, 1.3, 1.9), row_ms=2.0)
    assert rows.batch_ms(10.0, 1) == 10.0  # one session: its step, messages included
    assert rows.batch_ms(10.0, 4) == pytest.approx(10.0 * 1.3 + 3 * 2.0)
    assert _profile(row_ms=2.0).batch_ms(10.0, 4) == 40.0  # one session a call: whole steps, nothing added
    times, plain = [10.0, 20.0], _profile((1.1, 1.3, 1.9))
    # 8 sessions on 2 stages: groups of 4 rows, the busiest stage serves both groups
    assert cost.pipelined_ms(times, [rows] * 2, 8) == pytest.approx(2 * (20 * 1.3 + 3 * 2.0) / 8)
    assert cost.pipelined_ms(times, [rows] * 2, 8) > cost.pipelined_ms(times, [plain] * 2, 8)
    assert cost.pipelined_ms(times, [rows] * 2, 2) == cost.pipelined_ms(times, [plain] * 2, 2)  # a row each
