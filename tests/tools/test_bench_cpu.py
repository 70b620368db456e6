"""bench hetero's CPU meters: (b) says how busy the cores, and each node, were during the streams."""

from __future__ import annotations

import os
import sys
import time

import pytest

from linguamq.tools.bench.hetero import busy_share, cpu_ticks, node_busy


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/stat")
def test_one_spinning_thread_keeps_at_least_one_core_busy() -> None:
    before = cpu_ticks()
    until = time.perf_counter() + 0.5
    while time.perf_counter() < until:
        pass
    share = busy_share(before, cpu_ticks())
    assert share is not None and 0.8 / os.cpu_count() <= share <= 1.0


def test_no_reading_gives_no_share() -> None:
    assert busy_share(None, (5, 10)) is None and busy_share((5, 10), (5, 10)) is None
    assert busy_share((0, 0), (3, 4)) == 0.75


def test_node_busy_is_running_time_over_the_phases_time() -> None:
    # two multi-stream phases of 2 s and 3 s; d1 ran pieces 1.5 s then 2.5 s, d2 1 s in the second
    spans = [({"d1": 100.0, "d2": 50.0}, {"d1": 1600.0, "d2": 50.0}, 2.0),
             ({"d1": 1600.0, "d2": 50.0}, {"d1": 4100.0, "d2": 1050.0}, 3.0)]
    assert node_busy(spans) == pytest.approx({"d1": 0.8, "d2": 0.2})
    # a node first heard of after a phase began counts from its first report (no share of a span)
    assert node_busy([({}, {"d3": 900.0}, 1.0)]) == {"d3": 0.0} and node_busy([]) == {}
