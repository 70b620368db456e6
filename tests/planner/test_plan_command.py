"""`linguamq plan SCENARIO.json` as a user runs it, on the examples and on bad input."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from linguamq.schemas.cluster import Plan
from linguamq.schemas.examples import MANIFEST
from linguamq.tools.cli import main

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
Capsys = pytest.CaptureFixture[str]
DEVICE = {"name": "phone", "ms_per_gflop": 20, "mem_mb": 2048, "uplink_mbps": 50, "downlink_mbps": 100, "rtt_ms": 10}
PIECES = [{"name": "embed", "bytes": 1000, "flops_per_token": 0, "act_bytes_per_token": 256},
          {"name": "layer", "count": 6, "bytes": 1000, "flops_per_token": 10**7, "act_bytes_per_token": 256,
           "kv_bytes_per_token": 64, "attn_flops_per_position": 100},
          {"name": "head", "bytes": 1000, "flops_per_token": 10**6, "act_bytes_per_token": 2048}]


def plan_cli(capsys: Capsys, *args: str) -> tuple[int, str, str]:
    code = main(["plan", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def write(tmp_path: Path, scenario: dict[str, Any], name: str = "scenario.json") -> str:
    path = tmp_path / name
    path.write_text(json.dumps(scenario))
    return str(path)


def test_the_phones_example_prints_stages_speed_bottleneck_and_who_is_left_out(capsys: Capsys) -> None:
    code, out, _ = plan_cli(capsys, str(EXAMPLES / "scenario-phones.json"))
    assert code == 0
    assert "24 pieces, 6 devices" in out and "objective latency: optimal" in out
    assert "ms/token single stream" in out and "tokens/s" in out and "bottleneck: " in out
    assert "watch: not enough memory for any segment" in out
    stage_lines = [line for line in out.splitlines() if line[:1].isdigit()]
    assert stage_lines and stage_lines[0].split()[2] == "0..5" and stage_lines[-1].split()[2].endswith("..23")


def test_json_output_carries_the_plan_and_its_explanation(capsys: Capsys) -> None:
    code, out, _ = plan_cli(capsys, str(EXAMPLES / "scenario-home-7b.json"), "--objective", "throughput", "--json")
    report = json.loads(out)
    plan = Plan.from_dict(report["plan"])
    assert code == 0 and plan.objective == "throughput" and plan.optimal
    assert [(s["node"], s["first"], s["last"]) for s in report["stages"]] == [
        (s.node, s.first, s.last) for s in plan.stages]
    assert report["ms_per_token"] == pytest.approx(sum(s["predicted_ms"] for s in report["stages"]))
    assert report["bottleneck"] == plan.bottleneck and report["solve_s"] > 0
    assert all(s["mem_mb"] <= s["mem_budget_mb"] for s in report["stages"])


def test_throughput_objective_serves_more_tokens_per_second_than_latency(capsys: Capsys) -> None:
    scenario = str(EXAMPLES / "scenario-home-7b.json")
    latency = json.loads(plan_cli(capsys, scenario, "--json")[1])
    throughput = json.loads(plan_cli(capsys, scenario, "--json", "--objective", "throughput")[1])
    assert throughput["pipelined_tokens_per_s"] > latency["pipelined_tokens_per_s"]
    assert latency["ms_per_token"] < throughput["ms_per_token"]


def test_a_manifest_path_is_relative_to_the_scenario(tmp_path: Path, capsys: Capsys) -> None:
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "manifest.json").write_bytes(MANIFEST.to_json())
    code, out, _ = plan_cli(capsys, write(tmp_path, {"manifest": "model/manifest.json", "devices": [DEVICE]}),
                            "--json")
    assert code == 0 and json.loads(out)["stages"][0]["last"] == len(MANIFEST.pieces) - 1


def test_inline_pieces_repeat_with_count(tmp_path: Path, capsys: Capsys) -> None:
    code, out, _ = plan_cli(capsys, write(tmp_path, {"pieces": PIECES, "devices": [DEVICE]}), "--json")
    assert code == 0 and json.loads(out)["stages"] == [pytest.approx(json.loads(out)["stages"][0])]
    assert json.loads(out)["stages"][0]["last"] == 7  # embed, 6 layers, head


BAD = [
    ({"pieces": PIECES, "devices": [DEVICE | {"speed": 3}]}, "devices[0].speed: unknown field"),
    ({"pieces": PIECES, "devices": [{k: v for k, v in DEVICE.items() if k != "rtt_ms"}]}, "devices[0].rtt_ms: missing"),
    ({"pieces": PIECES, "devices": [DEVICE | {"mem_mb": -1}]}, "devices[0].mem_mb: -1.0 is below the minimum 0"),
    ({"pieces": PIECES, "devices": [DEVICE | {"uplink_mbps": "fast"}]}, "devices[0].uplink_mbps: expected a finite"),
    ({"pieces": PIECES, "devices": [DEVICE, DEVICE]}, "devices[1].name: device name 'phone' appears twice"),
    ({"devices": [DEVICE]}, "manifest: give either a manifest path or inline pieces"),
    ({"manifest": "m.json", "pieces": PIECES, "devices": [DEVICE]}, "manifest: give either"),
    ({"pieces": [PIECES[0] | {"count": 2000}], "devices": [DEVICE]}, "pieces[0].count: 2000 is above the maximum"),
    ({"pieces": PIECES, "devices": [DEVICE], "max_sessions": 0}, "max_sessions: 0 is below the minimum 1"),
    ({"manifest": "missing.json", "devices": [DEVICE]}, "cannot read"),
    ({"pieces": PIECES, "devices": [DEVICE | {"mem_mb": 1}]}, "needs 201 MB (weights, KV cache for 2048 tokens x 1 session, runtime overhead), "
                                                         "the node online offers 1 MB"),
    ({"pieces": PIECES, "devices": []}, "no nodes online"),
]


@pytest.mark.parametrize(("scenario", "message"), BAD, ids=[m.split(":")[0] for _, m in BAD])
def test_bad_input_exits_2_with_one_line_naming_the_problem(tmp_path: Path, capsys: Capsys,
                                                           scenario: dict[str, Any], message: str) -> None:
    code, out, err = plan_cli(capsys, write(tmp_path, scenario))
    assert code == 2 and out == ""
    assert err.startswith("linguamq plan: error: ") and err.count("\n") == 1 and message in err


def test_a_file_that_is_not_json_or_not_there_exits_2(tmp_path: Path, capsys: Capsys) -> None:
    (tmp_path / "broken.json").write_text("{devices: [")
    assert plan_cli(capsys, str(tmp_path / "broken.json"))[2].startswith("linguamq plan: error: ")
    code, _, err = plan_cli(capsys, str(tmp_path / "nowhere.json"))
    assert code == 2 and "cannot read" in err and "nowhere.json" in err
