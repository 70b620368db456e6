"""Limits with clear errors (issue 7 point 4), on a real cluster: payload size, sessions
per node, KV cap, max_tokens, per-client rate. The `limits` case of `linguamq bench chaos`."""

from __future__ import annotations

import pytest

from linguamq.tools.chaos.case import ChaosContext
from linguamq.tools.chaos.inputs import limits

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_every_limit_is_refused_clearly_and_the_requests_within_limits_are_exact(artifacts, tmp_path) -> None:
    outcome = limits(ChaosContext(artifacts=artifacts["llama"], workdir=tmp_path, full=False))
    assert outcome.ok, outcome.observed
    assert "sessions: 1/2 refused" in outcome.figure
    limited = int(outcome.figure.split("rate: ")[1].split("/")[0])
    assert 3 <= limited <= 5, outcome.figure  # burst 3 of 8 pass, and perhaps one refilled at 0.2/s
