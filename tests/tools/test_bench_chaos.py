"""`linguamq bench chaos` writes RELIABILITY.md's table from the cases' outcomes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from linguamq.tools.bench import chaos as bench_chaos
from linguamq.tools.chaos.case import TABLE_HEADER, Case, ChaosContext, Outcome
from linguamq.tools.chaos.security import LIVE, RETAINED_SEEN
from linguamq.tools.cli import main


def rows(text: str, case: str) -> list[list[str]]:
    """The cells of ``case``'s rows in a written table."""
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in text.splitlines()
            if line.startswith(f"| {case} |")]


@pytest.mark.integration
@pytest.mark.slow
def test_bench_chaos_quick_two_cases_write_a_table(tmp_path: Path) -> None:
    # `mosquitto parity` makes its scratch directory inside the case's workdir: the bench must create it.
    out = tmp_path / "RELIABILITY.md"
    proc = subprocess.run([sys.executable, "-m", "linguamq.tools.cli", "bench", "chaos", "--json", "--quick",
                           "--only", "limits", "--only", "mosquitto parity", "--out", str(out),
                           "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes = {o["case"]: o for o in json.loads(proc.stdout)}
    assert list(outcomes) == ["limits", "mosquitto parity"]
    parity, limited = outcomes["mosquitto parity"]["counts"], outcomes["limits"]["counts"]
    assert parity["identical"] == parity["outcomes"] == len(LIVE) + len(RETAINED_SEEN)
    assert (limited["sessions_refused"], limited["sessions_identical"]) == (1, 1) and limited["rate_limited"] > 0
    text = out.read_text()
    assert text.startswith("# Reliability and security") and TABLE_HEADER in text
    assert "Command: `linguamq bench chaos --json --quick --only limits" in text
    for case, outcome in outcomes.items():  # one row per case, what the run measured
        assert rows(text, case) == [[case, outcome["injected"], outcome["observed"], outcome["figure"], "yes"]]


def test_a_case_that_crashes_is_a_row_that_says_so_and_fails_the_run(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def crash(ctx: ChaosContext) -> Outcome:
        raise RuntimeError("the cluster never became ready\nsecond line")

    monkeypatch.setattr(bench_chaos, "load_cases", lambda: [Case("crashing", crash)])
    out = tmp_path / "R.md"
    assert main(["bench", "chaos", "--out", str(out), "--artifacts", str(tmp_path), "--workdir",
                 str(tmp_path / "work")]) == 1
    assert rows(out.read_text(), "crashing") == [["crashing", "(the case did not finish)",
                                                  "RuntimeError: the cluster never became ready", "-", "**no**"]]
    assert "FAILED" in capsys.readouterr().err


def test_an_unknown_case_is_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "linguamq.tools.cli", "bench", "chaos", "--only", "nope",
                           "--out", str(tmp_path / "R.md")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no case ['nope']" in proc.stderr
    assert not (tmp_path / "R.md").exists()
