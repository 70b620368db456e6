"""Hostile input (issue 7 point 3): malformed payloads on every followed topic, valid
requests flowing meanwhile. The same case as `linguamq bench chaos`, at the tests' counts
(200 per topic instead of 10,000)."""

from __future__ import annotations

import re

import pytest

from linguamq.tools.chaos.case import ChaosContext
from linguamq.tools.chaos.inputs import hostile_input

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_malformed_payloads_on_every_topic_are_refused_once_each_and_nothing_breaks(artifacts, tmp_path) -> None:
    outcome = hostile_input(ChaosContext(artifacts=artifacts["llama"], workdir=tmp_path, full=False))
    assert outcome.ok, outcome.observed
    sent = int(re.search(r"([\d,]+) malformed payloads", outcome.injected).group(1).replace(",", ""))
    topics = int(re.search(r"each of (\d+) topics", outcome.injected).group(1))
    assert topics >= 21 and sent == 200 * topics
    valid = re.search(r"(\d+) valid requests token-identical to run-local, 0 wrong, 0 failed", outcome.observed)
    assert valid and int(valid.group(1)) > 0, outcome.observed
    answered = int(re.search(r"([\d,]+) ErrorReports", outcome.observed).group(1).replace(",", ""))
    # every topic but the two nobody follows after start-up (probe, blob chunks) x 2 nodes;
    # `model` is refused by both nodes
    assert answered == 200 * (topics - 4 + 1), outcome.observed
    assert "internal" not in outcome.observed
