"""`linguamq bench chaos` writes RELIABILITY.md's table (one fast case, quick counts)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from linguamq.tools.chaos.case import TABLE_HEADER

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_bench_chaos_quick_two_cases_write_a_table(tmp_path) -> None:
    # `mosquitto parity` makes its scratch directory inside the case's workdir: the bench must create it.
    out = tmp_path / "RELIABILITY.md"
    proc = subprocess.run([sys.executable, "-m", "linguamq.tools.cli", "bench", "chaos", "--quick", "--only", "limits",
                           "--only", "mosquitto parity", "--out", str(out), "--workdir", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert text.startswith("# Reliability and security") and TABLE_HEADER in text
    assert "Command: `linguamq bench chaos --quick --only limits" in text
    for case in ("limits", "mosquitto parity"):
        rows = [line for line in text.splitlines() if line.startswith(f"| {case} |")]
        assert len(rows) == 1 and rows[0].endswith("| yes |"), rows


def test_an_unknown_case_is_a_clear_error(tmp_path) -> None:
    proc = subprocess.run([sys.executable, "-m", "linguamq.tools.cli", "bench", "chaos", "--only", "nope",
                           "--out", str(tmp_path / "R.md")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no case ['nope']" in proc.stderr
    assert not (tmp_path / "R.md").exists()
