"""`linguamq bench hetero` and `linguamq bench failover` end to end on very small models
(the real runs use the ~100M model): each report comes from real runs (real plans of the
model, measured tokens), not speed.

`bench hetero` is run with parts a and d only: every part starts its own cluster(s), and
all four take about 30 s even on a tiny model; parts b and c share the code paths of a.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from linguamq.tools.cli import main

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TINY = ["--layers", "2", "--hidden", "64", "--heads", "4", "--vocab", "300"]


def test_bench_hetero_reports_planned_vs_even_and_the_prediction(capsys: pytest.CaptureFixture[str],
                                                                  tmp_path: Path) -> None:
    code = main(["bench", "hetero", "--json", "--workdir", str(tmp_path), *TINY, "--new-tokens", "8", "--reps", "1",
                 "--warmup", "0.5", "--parts", "a,d"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    devices = {d["name"] for d in report["devices"]}
    for side in ("planned", "even"):
        run = report[side]
        # a plan the cluster ran: every piece of the model once, in order, on the emulated devices
        assert pieces_of(run["stages"]) == list(range(report["pieces"])), run["stages"]
        assert {stage.split(":")[0] for stage in run["stages"]} <= devices
        assert len(run["ms_per_token_all"]) == 1 and 0 < run["ms_per_token"] < 10_000  # --reps 1, measured
    assert len(report["even"]["stages"]) == len(devices)  # LinguaLinked's split: every device a stage
    assert len(report["planned"]["stages"]) >= 2  # --mem-share 0.6: no device holds the whole model
    assert report["prediction"]["predicted_ms_per_token"] > 0
    assert "pipelined" not in report and "throttle" not in report  # parts b and c were not run


def pieces_of(stages: list[str]) -> list[int]:
    """The pieces of stages written "node:first-last", in stage order."""
    out: list[int] = []
    for stage in stages:
        first, last = stage.split(":")[1].split("-")
        out += range(int(first), int(last) + 1)
    return out


def test_bench_hetero_rejects_an_unknown_part(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["bench", "hetero", "--workdir", str(tmp_path), "--parts", "a,x"]) == 2
    assert "--parts" in capsys.readouterr().err


def test_bench_failover_reports_the_recovery_and_equal_output(capsys: pytest.CaptureFixture[str],
                                                             tmp_path: Path) -> None:
    code = main(["bench", "failover", "--json", "--workdir", str(tmp_path), *TINY, "--new-tokens", "100",
                 "--kill-after", "8", "--reps", "1"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    (rep,) = report["reps"]
    assert len(rep["stages"]) == 3 and rep["stages"][1].startswith(f"{rep['victim']}:")  # the middle stage's node
    assert rep["events"] > 8 and 0 < rep["next_token_s"] and rep["recovery_s"] < 60  # text streamed after the kill
    assert rep["equals_run_local"]
