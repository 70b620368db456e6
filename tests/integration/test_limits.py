"""Limits with clear errors (issue 7 point 4), on a real cluster: payload size, sessions
per node, KV cap, max_tokens, per-client rate. The `limits` case of `linguamq bench chaos`;
the assertions are on the errors users got and the case's counts."""

from __future__ import annotations

import pytest

from linguamq.tools.chaos.case import ChaosContext
from linguamq.tools.chaos.inputs import limits

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_every_limit_is_refused_clearly_and_the_requests_within_limits_are_exact(artifacts, tmp_path) -> None:
    outcome = limits(ChaosContext(artifacts=artifacts["llama"], workdir=tmp_path, full=False))
    c, seen = outcome.counts, outcome.counts.refusals
    assert "exceeds max_payload" in seen["payload"], seen  # refused by our client before sending
    assert seen["broker"] == "closed", seen  # a raw client's oversized PUBLISH: the broker hangs up
    assert "exceeds this hub's cap" in seen["max_tokens"], seen
    assert "more than the cap" in seen["kv"], seen
    assert "--max-sessions" in seen["sessions"], seen
    assert "rate limited" in seen["rate"], seen
    assert (c.sessions, c.sessions_refused, c.sessions_identical) == (2, 1, 1), outcome
    assert c.burst == 8 and 3 <= c.rate_limited <= 5, outcome  # burst 3 of 8 pass, and perhaps one refilled at 0.2/s
    assert c.other_client_identical and c.dead == (), outcome
