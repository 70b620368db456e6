"""`linguamq bench transport` with tiny counts: hops measured on both brokers, not the speed."""

from __future__ import annotations

import json
import time

import pytest

from linguamq.tools.cli import main

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("embedded_in", ["process", "thread"])
def test_bench_transport_measures_both_brokers_at_both_sizes(capsys: pytest.CaptureFixture[str],
                                                           embedded_in: str) -> None:
    code = main(["bench", "transport", "--json", "--count-small", "5", "--count-large", "3",
                 "--warmup", "1", "--embedded-in", embedded_in])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["embedded_in"] == embedded_in
    rows = {(r["broker"], r["size"]): r for r in report["results"]}
    assert set(rows) == {(b, s) for b in ("embedded", "mosquitto") for s in ("8KiB", "1MiB")}
    for (_, size), row in rows.items():
        assert row["count"] == (5 if size == "8KiB" else 3)  # the timed hops asked for, warm-up left out
        assert 0 < row["min_ms"] and row["max_ms"] < 5_000  # real hops through a local broker
    assert set(report["ratio_embedded_to_mosquitto"]) == {"8KiB", "1MiB"}
    assert report["mosquitto_version"]  # the mosquitto compared with, as it reports itself


def test_bench_transport_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "transport", "--count-small", "2", "--count-large", "2", "--warmup", "0"]) == 0
    out = capsys.readouterr().out
    assert "embedded / mosquitto median at 8KiB" in out
    rows = [line.split()[:2] for line in out.splitlines() if line.split()[1:2] in (["8KiB"], ["1MiB"])]
    assert sorted(rows) == [["embedded", "1MiB"], ["embedded", "8KiB"], ["mosquitto", "1MiB"], ["mosquitto", "8KiB"]]


def test_bench_transport_idle_pauses_are_not_counted_in_the_hop(capsys: pytest.CaptureFixture[str]) -> None:
    """--idle: each hop starts from idle processes; the pause itself is no part of the figure."""
    started = time.monotonic()
    assert main(["bench", "transport", "--json", "--count-small", "3", "--count-large", "2", "--warmup", "0",
                 "--idle", "40"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["idle_ms"] == 40
    assert time.monotonic() - started >= 2 * (3 + 2) * 0.040  # every hop of both brokers paused
    assert all(r["median_ms"] < 40 for r in report["results"] if r["size"] == "8KiB")


def test_bench_transport_refuses_a_negative_idle() -> None:
    with pytest.raises(SystemExit, match="--idle must be >= 0"):
        main(["bench", "transport", "--idle", "-1"])
