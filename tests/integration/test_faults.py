"""Node and hub faults and duplicated deliveries on a real cluster (tools/chaos/faults.py):
the fast variants of the `linguamq bench chaos` cases, fewer requests, a 4 s freeze.

Each case counts what it saw (requests token-identical to run-local, requests the fault
interrupted mid-stream, epochs, ...); these tests state the promise on those counts
themselves, not through the case's own verdict.
"""

from __future__ import annotations

import pytest

from linguamq.tools.chaos import faults as chaos_faults
from linguamq.tools.chaos.case import ChaosContext

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def ctx(artifacts, tmp_path) -> ChaosContext:
    return ChaosContext(artifacts=artifacts["llama"], workdir=tmp_path, full=False)


def test_duplicated_deliveries_give_no_duplicated_or_skipped_token(ctx) -> None:
    outcome = chaos_faults.duplicates(ctx)
    c = outcome.counts
    assert c.act_copies > 0 and c.out_copies > 0, outcome  # the duplicates were delivered
    assert (c.identical, c.repeated, c.skipped) == (c.requests, 0, 0), outcome


def test_kill_9_a_node_during_concurrent_requests(ctx) -> None:
    outcome = chaos_faults.node_kill(ctx)
    c = outcome.counts
    assert c.interrupted > 0, outcome  # the kill hit requests mid-stream
    assert c.identical == c.requests == 16, outcome
    assert (c.victim_in_plan, c.plan_nodes) == (False, 2) and c.epoch_after > c.epoch_before, outcome


def test_no_plan_fits_ends_requests_with_a_clear_error(ctx) -> None:
    outcome = chaos_faults.no_plan_fits(ctx)
    c = outcome.counts
    assert c.hung == 0 and c.clear > 0 and c.identical + c.clear == c.requests, outcome
    assert "no plan fits the nodes online" in c.example
    assert c.late_error is not None and "no plan fits the nodes online" in c.late_error
    assert c.ended_s < 30, outcome  # at once, not after the head's 60 s step timeout


def test_a_frozen_node_thaws_rejoins_and_computes_again(ctx) -> None:
    outcome = chaos_faults.node_freeze(ctx)
    c = outcome.counts
    assert c.interrupted > 0, outcome  # the freeze stalled requests mid-stream
    assert c.identical == c.requests == 4 + 2, outcome  # 2 of them sent after the thaw
    assert c.steps_after_thaw > 0, outcome  # the thawed node is back in the pipeline


def test_hub_restart_nodes_reconnect_and_requests_resume(ctx) -> None:
    outcome = chaos_faults.hub_restart(ctx)
    c = outcome.counts
    assert c.interrupted > 0 and c.resends > 0, outcome  # requests in flight were re-sent to the new hub
    assert c.identical == c.requests == 3, outcome
    assert sorted(c.reconnect_s) == ["n1", "n2", "n3"] and c.nodes_back == 3, outcome
    assert max(s for s in c.reconnect_s.values() if s is not None) <= 5.0, outcome  # paho retries every 1..4 s
    assert c.epoch_after > c.epoch_before, outcome  # the new planner continued the count
