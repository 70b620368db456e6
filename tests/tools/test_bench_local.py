"""`linguamq bench local` end to end on a very small model (the real run uses ~100M params)."""

from __future__ import annotations

import json

import pytest

from linguamq.tools.cli import main


@pytest.mark.slow
def test_bench_local_reports_medians_ratios_and_rss(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "local", "--json", "--layers", "1", "--hidden", "64", "--heads", "4", "--vocab", "300",
                 "--prompt-tokens", "8", "--new-tokens", "4", "--reps", "2", "--threads", "1"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    for side in ("run_local", "transformers"):
        assert len(report[side]["ms_per_token_all"]) == 2 and report[side]["ms_per_token"] > 0
    assert report["decode_speedup"] == pytest.approx(
        report["transformers"]["ms_per_token"] / report["run_local"]["ms_per_token"])
    # The child never imports torch: a tiny model's run-local process stays small.
    assert 0 < report["run_local"]["peak_rss_mb"] < 400
    assert set(report["targets_met"]) == {"decode_speedup", "peak_rss"}
