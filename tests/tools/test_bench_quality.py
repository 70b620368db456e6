"""`linguamq bench quality` end to end on one very small random model (the real run: bench dims + SmolLM2)."""

from __future__ import annotations

import json

import pytest

from linguamq.tools.cli import main


def test_bench_quality_compares_each_export_with_fp32(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "quality", "--json", "--families", "qwen2", "--layers", "1", "--hidden", "64", "--heads", "4",
                 "--vocab", "300", "--smollm2", "no", "--prompts", "2", "--new-tokens", "8", "--threads", "1"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    rows = {row["variant"]: row for row in report["rows"]}
    assert [row["model"] for row in report["rows"]] == ["random qwen2"] * 3 and set(rows) == {"fp32", "int8", "int4"}
    assert (rows["fp32"]["prefix"], rows["fp32"]["agreement"], rows["fp32"]["forced"]) == (1.0, 1.0, 1.0)
    for row in rows.values():
        assert len(row["per_prompt"]) == 2 and all(len(p["tokens"]) == 8 for p in row["per_prompt"])
        assert 0 <= row["prefix"] <= row["agreement"] <= 1 and 0 <= row["forced"] <= 1
    assert rows["int4"]["mb"] < rows["int8"]["mb"] < rows["fp32"]["mb"]
