"""Hostile input (issue 7 point 3): malformed payloads on every followed topic, valid
requests flowing meanwhile. The same case as `linguamq bench chaos`, at the tests' counts
(200 per topic instead of 10,000); the assertions are on the case's counts."""

from __future__ import annotations

import pytest

from linguamq.tools.chaos.case import ChaosContext
from linguamq.tools.chaos.inputs import hostile_input

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_malformed_payloads_on_every_topic_are_refused_once_each_and_nothing_breaks(artifacts, tmp_path) -> None:
    outcome = hostile_input(ChaosContext(artifacts=artifacts["llama"], workdir=tmp_path, full=False))
    c = outcome.counts
    assert c.topics >= 21 and c.sent == 200 * c.topics, outcome
    assert c.dead == (), outcome
    assert c.valid_identical > 0 and (c.valid_wrong, c.valid_failed) == (0, 0), outcome
    # Every topic but the two nobody follows after start-up (probe, blob chunks) x 2 nodes is
    # answered once per payload; `model` by both nodes.
    assert c.misanswered == 0, outcome
    assert c.reports == 200 * (c.topics - 4 + 1), outcome
    assert "internal" not in c.codes, outcome  # no handler failed
    assert c.counted == c.reported, outcome  # each reporter's telemetry counts its refusals
    for name, before in c.rss_before_mb.items():
        assert 0 < c.rss_after_mb[name] <= 1.25 * before + 32, (name, outcome)
