"""The live planner's drift detection, fed status and telemetry directly (no broker).

Regressions found by tests/integration/test_replanning.py and `linguamq bench hetero`:
a stage without FLOPs (the embedding alone) was "predicted" ~0 ms, so its first reports
scaled its node's profile by ~10^6; and when one node's first measurements corrected its
profile, the nodes not measured yet kept their optimistic probes and looked faster, so a
steady cluster moved work to them (a new epoch per node, as each got measured in turn).
"""

from __future__ import annotations

import dataclasses

import pytest

from linguamq import topics
from linguamq.planner.service import PlannerService, PlannerSettings
from linguamq.schemas.cluster import NodeStatus, PieceTiming, Plan, Profile, Stage, Telemetry
from linguamq.schemas.examples import MANIFEST, SHA

CLUSTER = "t"
PROFILE = Profile(ms_per_gflop_decode=50.0, ms_per_gflop_prefill=20.0, mem_budget_mb=0.0, rtt_ms=0.5,
                  uplink_mbps=1000.0, downlink_mbps=1000.0)


class _Client:
    def __init__(self) -> None:
        self.published: list[tuple[str, object]] = []

    def publish(self, topic, name, payload, wait=None) -> None:
        self.published.append((name, payload))

    def report_error(self, *args, **kwargs) -> None:
        raise AssertionError(f"unexpected error report: {args} {kwargs}")


def _manifest():
    embed, layer, head = MANIFEST.pieces[0], MANIFEST.pieces[1], MANIFEST.pieces[-1]
    layers = [dataclasses.replace(layer, index=i + 1, name=f"layer.{i}", file=f"layer.{i}.onnx") for i in range(4)]
    pieces = (dataclasses.replace(embed, flops_per_token=0, flops_per_prompt_token=0), *layers,
              dataclasses.replace(head, index=5))
    return dataclasses.replace(MANIFEST, num_layers=4, pieces=pieces)


@pytest.fixture
def service() -> PlannerService:
    """Nodes a (the embedding alone), b (every layer and the head) and c (idle), epoch 1."""
    svc = PlannerService(client=_Client(), cluster=CLUSTER, manifest=_manifest(), manifest_sha256=SHA,
                         settings=PlannerSettings(objective="latency"))
    for node in "abc":
        status = NodeStatus(node=node, state="ready", ts=1.0, epoch=1, profile=PROFILE)
        svc._on_status(topics.NODE_STATUS.build(CLUSTER, node=node), status, False)
    svc.plan = Plan(epoch=1, objective="latency", predicted_ms_per_token=1.0,
                    stages=(Stage(node="a", first=0, last=0, predicted_ms=0.5),
                            Stage(node="b", first=1, last=5, predicted_ms=0.5)))
    return svc


def report(svc: PlannerService, node: str, ms: float, reports: int = 3) -> None:
    first = next(s.first for s in svc.plan.stages if s.node == node)
    for seq in range(reports):
        telemetry = Telemetry(node=node, ts=2.0 + seq, seq=seq, epoch=svc.plan.epoch,
                              pieces=(PieceTiming(piece=first, ms_ewma=ms, runs=10 + seq),))
        svc._on_telemetry(topics.NODE_TELEMETRY.build(CLUSTER, node=node), telemetry, False)


def predicted(svc: PlannerService, node: str) -> float:
    return svc._predicted_compute(next(s for s in svc.plan.stages if s.node == node))


def test_a_stage_without_flops_never_drifts(service: PlannerService) -> None:
    assert predicted(service, "a") == 0.0
    report(service, "a", 0.05, reports=5)  # an embedding lookup's fixed per-call time
    assert service._scale_of("a") == 1.0 and not service._drift_due
    assert service._measured["a"] == 0.05  # still shown beside the prediction


def test_a_drift_is_confirmed_by_consecutive_reports(service: PlannerService) -> None:
    report(service, "b", 2.5 * predicted(service, "b"), reports=2)
    assert not service._drift_due and service._scale_of("b") == 1.0
    report(service, "b", 2.5 * predicted(service, "b"), reports=1)
    assert service._drift_due and service._scale_of("b") == pytest.approx(2.5)


def test_an_unmeasured_node_is_assumed_off_like_the_measured_ones(service: PlannerService) -> None:
    report(service, "b", 2.5 * predicted(service, "b"))
    assert service._scale_of("c") == pytest.approx(2.5)  # idle: corrected like b's probe was
    scaled = service._candidate("c").profile
    assert scaled.ms_per_gflop_decode == pytest.approx(2.5 * PROFILE.ms_per_gflop_decode)


def test_a_slowdown_after_the_first_measurement_is_not_taken_for_probe_error(service: PlannerService) -> None:
    report(service, "b", 1.1 * predicted(service, "b"), reports=1)  # first measured: as predicted
    report(service, "b", 4.0 * predicted(service, "b"))  # then 4x slower: the node, not the probe
    assert service._scale_of("b") == pytest.approx(4.0)
    assert service._scale_of("c") == pytest.approx(1.0)


def test_a_slowdown_before_a_first_drift_is_confirmed_is_not_taken_for_probe_error(service: PlannerService) -> None:
    """A probe that overstates every node (one layer pays a whole call; a merged segment pays it
    once): b is first measured at 0.42x, then slowed 4x before its drift was confirmed. The idle
    node c must be assumed off like b's probe was (0.42x), not like b's slowed state (1.7x): the
    replanning test kept a slowed node's work because the idle one looked that slow."""
    base = predicted(service, "b")
    report(service, "b", 0.42 * base, reports=1)  # first measured: the probe was 2.4x off
    report(service, "b", 1.68 * base, reports=3)  # then 4x slower, confirmed by three reports
    assert service._scale_of("b") == pytest.approx(1.68)
    assert service._scale_of("c") == pytest.approx(0.42)


def test_a_throughput_plan_is_compared_by_its_period_not_its_latency() -> None:
    """`Plan.predicted_ms_per_token` is the single-stream latency whatever the objective;
    the replan decision compares the pipeline periods of the current and proposed plans."""
    embed, layer, head = MANIFEST.pieces[0], MANIFEST.pieces[1], MANIFEST.pieces[-1]
    layers = [dataclasses.replace(layer, index=i + 1, name=f"layer.{i}", file=f"layer.{i}.onnx",
                                  flops_per_token=100_000_000, attn_flops_per_position=0) for i in range(12)]
    pieces = (dataclasses.replace(embed, flops_per_token=0), *layers,
              dataclasses.replace(head, index=13, flops_per_token=0))
    client = _Client()
    svc = PlannerService(client=client, cluster=CLUSTER, manifest=dataclasses.replace(MANIFEST, num_layers=12,
                                                                                       pieces=pieces),
                         manifest_sha256=SHA, settings=PlannerSettings(objective="throughput", max_sessions=3))
    for node in "abc":
        svc._on_status(topics.NODE_STATUS.build(CLUSTER, node=node),
                       NodeStatus(node=node, state="ready", ts=1.0, epoch=1, profile=PROFILE), False)
    svc.plan = Plan(epoch=1, objective="throughput", predicted_ms_per_token=60.0,
                    stages=(Stage(node="a", first=0, last=4, predicted_ms=20.0),
                            Stage(node="b", first=5, last=8, predicted_ms=20.0),
                            Stage(node="c", first=9, last=13, predicted_ms=20.0)))
    svc._planned_for = frozenset("abc")
    svc._scale["b"] = 1.5  # b measured 1.5x slower: its 4 layers now take 30 ms, the period
    before = svc._value(svc.plan)
    svc._on_drift(frozenset("abc"))
    plans = [p for _, p in client.published if isinstance(p, Plan)]
    assert len(plans) == 1, "a plan with a shorter period was not adopted"
    assert svc._value(plans[0]) < 0.9 * before
    assert plans[0].predicted_ms_per_token > before  # its latency: the old comparison kept the slow plan


def _adopt(svc: PlannerService, *stages: tuple[str, int, int]) -> Plan:
    """A plan of ``stages`` (node, first, last) published as the next epoch."""
    plan = Plan(epoch=svc._last_epoch + 1, objective="latency", predicted_ms_per_token=1.0,
                stages=tuple(Stage(node=n, first=a, last=b, predicted_ms=0.5) for n, a, b in stages))
    svc._publish(plan, frozenset("abc"), "test")
    return plan


def _heavy(b_scale: float) -> PlannerService:
    """Nodes a, b, c (same probe) on 4 layers of 100 MFLOP (5 ms each as probed); b measured
    ``b_scale`` times its probe, so layers a can take off it help."""
    layer = MANIFEST.pieces[1]
    layers = [dataclasses.replace(layer, index=i + 1, name=f"layer.{i}", file=f"layer.{i}.onnx",
                                  flops_per_token=100_000_000, attn_flops_per_position=0) for i in range(4)]
    pieces = (dataclasses.replace(MANIFEST.pieces[0], flops_per_token=0), *layers,
              dataclasses.replace(MANIFEST.pieces[-1], index=5, flops_per_token=0))
    svc = PlannerService(client=_Client(), cluster=CLUSTER, manifest_sha256=SHA,
                         manifest=dataclasses.replace(MANIFEST, num_layers=4, pieces=pieces))
    for node in "abc":
        svc._on_status(topics.NODE_STATUS.build(CLUSTER, node=node),
                       NodeStatus(node=node, state="ready", ts=1.0, epoch=1, profile=PROFILE), False)
    svc._scale["b"] = b_scale
    return svc


def _drift_proposes(svc: PlannerService, monkeypatch: pytest.MonkeyPatch, proposal: Plan) -> bool:
    """The drift's replan round, its solve returning ``proposal``: adopted?"""
    monkeypatch.setattr(svc, "_solve", lambda members: dataclasses.replace(proposal, epoch=svc._last_epoch + 1))
    epoch = svc.plan.epoch
    svc._drift_due = False
    svc._on_drift(frozenset("abc"))
    return svc.plan.epoch > epoch


def test_a_proposal_is_valued_by_what_its_segments_measured_when_they_ran(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node's correction is learned on the segment it runs. a ran pieces 0-2 at 2.5x their
    prediction, so 0-1 went to it instead; there it runs at 0.4x of the corrected prediction
    (the model's error differs by segment), and corrected again, 0-2 looks faster once more.
    Valued by what 0-2 measured when it ran, that plan is not taken back (in `bench hetero`
    (b) two plans alternated every 4-8 s, each epoch re-prefilling every session); once that
    measurement is older than ``segment_memory_s``, it is."""
    service = _heavy(b_scale=4.0)
    wide = _adopt(service, ("a", 0, 2), ("b", 3, 5))
    report(service, "a", 2.5 * predicted(service, "a"))  # a: 2.5x its probe on 0-2, from the first report
    _adopt(service, ("a", 0, 1), ("b", 2, 5))  # the replan that drift asked for (consumed)
    service._drift_due = False
    report(service, "a", 0.4 * predicted(service, "a"))  # on 0-1: 0.4x the corrected prediction
    assert service._drift_due and service._scale_of("a") == pytest.approx(1.0)
    assert service._value(wide) < 0.9 * service._value(service.plan)  # corrected: 0-2 looks faster
    assert not _drift_proposes(service, monkeypatch, wide)  # kept: 0-2 measured slower when it ran
    service.settings = dataclasses.replace(service.settings, segment_memory_s=-1.0)
    assert _drift_proposes(service, monkeypatch, wide)  # old news: taken


def test_a_node_that_recovers_from_a_throttle_takes_its_segment_back(monkeypatch: pytest.MonkeyPatch) -> None:
    """a runs 0-2 as predicted, is throttled 4x (its work goes to b), then recovers on 0-1:
    a drift on a segment it had run as predicted is a change of speed, and what 0-2 measured
    while throttled no longer holds it back."""
    service = _heavy(b_scale=2.0)
    wide = _adopt(service, ("a", 0, 2), ("b", 3, 5))
    report(service, "a", predicted(service, "a"))  # as predicted, as many reports as confirm a drift
    report(service, "a", 4.0 * predicted(service, "a"))  # throttled
    assert _drift_proposes(service, monkeypatch, Plan(epoch=0, objective="latency", predicted_ms_per_token=1.0,
                                                      stages=(Stage(node="a", first=0, last=1, predicted_ms=0.5),
                                                              Stage(node="b", first=2, last=5, predicted_ms=0.5))))
    report(service, "a", predicted(service, "a"))  # runs 0-1 as the throttled scale predicts
    report(service, "a", 0.25 * predicted(service, "a"))  # recovered
    assert service._scale_of("a") == pytest.approx(1.0)
    assert _drift_proposes(service, monkeypatch, wide)  # 0-2 back, within the segment memory


def test_a_stage_the_proposal_keeps_is_valued_alike_on_both_sides(monkeypatch: pytest.MonkeyPatch) -> None:
    """b runs 2-5 at 1.25x its prediction, inside the drift band: nothing to correct. A proposal
    4% faster by prediction that moves b's work to segments not measured yet is not adopted
    (10% hysteresis): valued by its measurement, the current plan would look 24 ms against
    19.5, and a steady cluster moved work on its first calibration (test_replanning)."""
    service = _heavy(b_scale=1.0)
    service._scale["a"] = 0.85
    _adopt(service, ("a", 0, 1), ("b", 2, 5))
    report(service, "a", predicted(service, "a"))
    report(service, "b", 1.25 * predicted(service, "b"))
    assert not service._drift_due
    shifted = Plan(epoch=0, objective="latency", predicted_ms_per_token=1.0,
                   stages=(Stage(node="a", first=0, last=2, predicted_ms=0.5),
                           Stage(node="b", first=3, last=5, predicted_ms=0.5)))
    assert 0.9 * service._value(service.plan) < service._value(shifted) < service._value(service.plan)
    assert not _drift_proposes(service, monkeypatch, shifted)
    keeps_b = dataclasses.replace(service.plan, stages=(Stage(node="c", first=0, last=1, predicted_ms=0.5),
                                                        service.plan.stages[1]))
    assert service._value(keeps_b, against=service.plan) == service._value(keeps_b)  # b's 2-5 as in the plan


def test_a_measured_row_cost_is_planned_with_and_a_large_change_asks_for_a_round() -> None:
    """Telemetry.row_ms, each session step's messages: the probe sees a fraction of it
    (0.15-0.33 ms against 1.25-2.2 measured in `bench hetero` (b)). Beyond the drift band it
    replaces the probe's in the profiles the planner values plans by, and a node of the
    plan asks for a drift round; inside the band, or on a node outside the plan, nothing."""
    batching = dataclasses.replace(PROFILE, batch_cost=(1.1, 1.3, 1.9), row_ms=0.2)
    svc = PlannerService(client=_Client(), cluster=CLUSTER, manifest=_manifest(), manifest_sha256=SHA,
                         settings=PlannerSettings(objective="throughput", max_sessions=8))
    for node in "abc":
        svc._on_status(topics.NODE_STATUS.build(CLUSTER, node=node),
                       NodeStatus(node=node, state="ready", ts=1.0, epoch=1, profile=batching), False)
    svc.plan = Plan(epoch=1, objective="throughput", predicted_ms_per_token=1.0,
                    stages=(Stage(node="a", first=0, last=2, predicted_ms=0.5),
                            Stage(node="b", first=3, last=5, predicted_ms=0.5)))

    def row_cost(node: str, ms: float) -> None:
        svc._on_telemetry(topics.NODE_TELEMETRY.build(CLUSTER, node=node),
                          Telemetry(node=node, ts=2.0, seq=1, epoch=1, row_ms=ms), False)

    before = svc._value(svc.plan)
    row_cost("b", 0.25)  # as probed, within 0.2 ms
    row_cost("c", 3.0)  # not in the plan: planned with, no round
    assert not svc._drift_due and svc._value(svc.plan) == before
    assert svc._candidate("c").profile.row_ms == 3.0
    row_cost("b", 2.0)
    assert svc._drift_due and svc._candidate("b").profile.row_ms == 2.0
    # two groups of 4 sessions: b's batch pays 3 more sessions' messages, in both groups
    assert svc._value(svc.plan) == pytest.approx(before + 2 * 3 * (2.0 - 0.2) / 8)
    svc._drift_due = False
    row_cost("b", 2.5)  # within the band of the cost in use: nothing
    assert not svc._drift_due and svc._candidate("b").profile.row_ms == 2.0
