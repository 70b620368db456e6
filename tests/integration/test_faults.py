"""Node and hub faults and duplicated deliveries on a real cluster (tools/chaos/faults.py):
the fast variants of the `linguamq bench chaos` cases, fewer requests, a 4 s freeze.

Each case compares every request with run-local's greedy tokens itself; these tests
assert its verdict and the finer points a user would notice.
"""

from __future__ import annotations

import pytest

from linguamq.tools.chaos import faults as chaos_faults
from linguamq.tools.chaos.case import ChaosContext, Outcome

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def ctx(artifacts, tmp_path) -> ChaosContext:
    return ChaosContext(artifacts=artifacts["llama"], workdir=tmp_path, full=False)


def check(outcome: Outcome) -> None:
    assert outcome.ok, outcome


def test_duplicated_deliveries_give_no_duplicated_or_skipped_token(ctx) -> None:
    outcome = chaos_faults.duplicates(ctx)
    check(outcome)
    assert "0 repeated and 0 skipped" in outcome.observed


def test_kill_9_a_node_during_concurrent_requests(ctx) -> None:
    outcome = chaos_faults.node_kill(ctx)
    check(outcome)
    assert outcome.observed.startswith("6/6 token-identical")


def test_no_plan_fits_ends_requests_with_a_clear_error(ctx) -> None:
    outcome = chaos_faults.no_plan_fits(ctx)
    check(outcome)
    assert "0 hung" in outcome.observed and "no plan fits the nodes online" in outcome.observed


def test_a_frozen_node_thaws_rejoins_and_computes_again(ctx) -> None:
    outcome = chaos_faults.node_freeze(ctx)
    check(outcome)
    assert outcome.observed.startswith("6/6 token-identical")


def test_hub_restart_nodes_reconnect_and_requests_resume(ctx) -> None:
    outcome = chaos_faults.hub_restart(ctx)
    check(outcome)
    assert outcome.observed.startswith("3/3 resumed token-identical")
