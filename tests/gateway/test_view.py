"""The dashboard's numbers, derived from the cluster's topics as they arrive."""

from __future__ import annotations

import asyncio

from linguamq.gateway.view import ClusterView
from linguamq.schemas.cluster import NodeStatus, Plan, Stage, Telemetry


def telemetry(node: str, ts: float, **fields) -> Telemetry:
    return Telemetry(node=node, ts=ts, seq=int(ts), epoch=1, **fields)


def test_busy_percent_and_tokens_per_second_come_from_counters_between_reports() -> None:
    view = ClusterView("home")
    view._on_telemetry("", telemetry("n1", 100.0, busy_ms=1000.0), False)
    view._on_telemetry("", telemetry("n1", 102.0, busy_ms=1500.0), False)  # 500 ms busy in 2 s
    view._on_hub("", telemetry("hub-home", 100.0, tokens=10, sessions=2), False)
    view._on_hub("", telemetry("hub-home", 104.0, tokens=90, sessions=3, queue_depth=1), False)
    state = view.snapshot()
    assert state["nodes"][0]["busy_pct"] == 25.0
    assert [rate for _, rate in state["tokens_per_s"]] == [20.0]
    assert state["requests"] == {"in_flight": 3, "queued": 1, "rejected": 0}


def test_nodes_go_offline_and_each_new_epoch_is_remembered_with_its_reason() -> None:
    view = ClusterView("home")
    view._on_status("", NodeStatus(node="n1", state="ready", ts=1.0), False)
    view._on_status("", NodeStatus(node="n2", state="ready", ts=1.0), False)
    plan = Plan(epoch=1, objective="latency", stages=(Stage(node="n1", first=0, last=4, predicted_ms=3.0),),
                predicted_ms_per_token=3.0, reason="joined: n1, n2")
    view._on_plan("", plan, True)
    view._on_plan("", plan, True)  # re-published: not a new epoch
    view._on_status("", NodeStatus(node="n2", state="offline", ts=2.0), False)
    view._on_plan("", Plan(epoch=2, objective="latency", stages=plan.stages, predicted_ms_per_token=3.0,
                           reason="left: n2"), True)
    state = view.snapshot()
    assert [(n["name"], n["online"]) for n in state["nodes"]] == [("n1", True), ("n2", False)]
    assert [(e["epoch"], e["reason"]) for e in state["epochs"]] == [(2, "left: n2"), (1, "joined: n1, n2")]
    assert state["plan"]["epoch"] == 2 and "type" not in state["plan"]


def test_a_stream_gets_a_snapshot_at_once_and_another_after_a_change() -> None:
    view = ClusterView("home")

    async def two() -> list[dict]:
        got = []
        async for snapshot in view.changes():
            got.append(snapshot)
            if len(got) == 1:
                asyncio.get_running_loop().call_later(0.05, view._on_status, "",
                                                      NodeStatus(node="n1", state="ready", ts=1.0), False)
            else:
                return got
        return got

    first, second = asyncio.run(asyncio.wait_for(two(), 5))
    assert first["nodes"] == [] and [n["name"] for n in second["nodes"]] == ["n1"]
