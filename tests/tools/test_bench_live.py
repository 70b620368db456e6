"""`linguamq bench hetero` and `linguamq bench failover` end to end on very small models
(the real runs use the ~100M model): the report's keys and self-consistency, not speed.

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
    assert [d["slowdown"] for d in report["devices"]] == [1.0, 1.5, 3.0, 4.0]
    assert report["even"]["objective"] == "even" and len(report["even"]["stages"]) == 4
    for side in ("planned", "even"):
        assert report[side]["ms_per_token"] > 0 and len(report[side]["ms_per_token_all"]) == 1
    assert report["planned_over_even"] == pytest.approx(
        report["planned"]["tokens_per_s"] / report["even"]["tokens_per_s"])
    prediction = report["prediction"]
    assert prediction["predicted_ms_per_token"] > 0
    assert prediction["head_over_predicted"] == pytest.approx(
        prediction["head_ms_per_token"] / prediction["predicted_ms_per_token"])
    assert set(report["targets"]) == {"planned_over_even", "pipelined_over_single", "rebalanced_over_static",
                                      "prediction_error"}
    assert "pipelined" not in report and "throttle" not in report


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
    assert rep["victim"] == "n2" and len(rep["stages"]) == 3
    assert 0 < rep["next_token_s"] <= rep["recovery_s"] < 60
    assert report["median_recovery_s"] == rep["recovery_s"]
    assert rep["equals_run_local"] and report["all_equal_run_local"]
    assert report["target_s"] == 3.0
