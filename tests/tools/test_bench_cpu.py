"""bench hetero's machine CPU meter: (b) says how busy the cores were during 4 streams."""

from __future__ import annotations

import os
import sys
import time

import pytest

from linguamq.tools.bench.hetero import busy_share, cpu_ticks


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
