"""`linguamq bench local` end to end on a very small model (the real run uses ~100M params)."""

from __future__ import annotations

import json

import pytest

from linguamq.tools.cli import main


@pytest.mark.slow
def test_bench_local_measures_both_sides_and_a_small_run_local_process(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "local", "--json", "--layers", "1", "--hidden", "64", "--heads", "4", "--vocab", "300",
                 "--prompt-tokens", "8", "--new-tokens", "4", "--reps", "2", "--threads", "1"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    for side in ("run_local", "transformers"):  # both sides ran --reps times and were measured
        assert len(report[side]["ms_per_token_all"]) == 2 and all(ms > 0 for ms in report[side]["ms_per_token_all"])
        assert report[side]["ttft_ms"] > 0
    # The child never imports torch: a tiny model's run-local process stays small.
    assert 0 < report["run_local"]["peak_rss_mb"] < 400
