"""Replanning on a live cluster: a node slowed mid-run loses work to a new epoch without
losing a request, and a steady cluster keeps its epoch (the planner's hysteresis).

The model is larger than the other integration tests' (8 layers of hidden 384): on a
3-layer hidden-64 model every piece costs about the same fixed per-call time, whatever
the plan. Node memory budgets force a split, as `linguamq demo` does.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from linguamq import topics
from linguamq.client import generate_remote, new_request_id
from linguamq.models.export import ExportOptions, export_model
from linguamq.models.tiny import TinySpec, make_tiny
from linguamq.planner import cost
from linguamq.schemas.cluster import NodeControl, Plan
from linguamq.schemas.manifest import ModelManifest
from linguamq.schemas.requests import GenerateRequest, GenerateResult
from linguamq.tools.testing.cluster import LocalCluster, NodeSpec
from linguamq.tools.testing.followers import PlanLog
from linguamq.topics.client import MqttClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = ["Hello world", "The quick brown fox", "MQTT carries tensors", "Once upon a time there was"]
STEADY_S = 12.0  # 4 drift windows (3 reports of 1 s each); the 60 s figure was verified when it landed (5f1311c)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("replan-model")
    make_tiny(TinySpec(family="llama", layers=8, hidden=384, heads=8, vocab=512, seed=31), root / "hf")
    export_model(root / "hf", root / "art", ExportOptions(max_context=256))
    return root / "art"


def budget_mb(art: Path, share: float) -> float:
    return cost.share_mb(ModelManifest.from_json((art / "manifest.json").read_bytes()), share)


def pieces_of(plan: Plan, node: str) -> int:
    return sum(s.last - s.first + 1 for s in plan.stages if s.node == node)


@dataclasses.dataclass
class Done:
    prompt: str
    max_tokens: int
    started: float
    ended: float
    result: GenerateResult


class Load:
    """``streams`` threads, each generating one request after another until stopped."""

    def __init__(self, client: MqttClient, cluster: str, *, streams: int, max_tokens: int, pause_s: float = 0.0):
        self.done: list[Done] = []
        self._stop = threading.Event()
        self._args = client, cluster, max_tokens, pause_s
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(streams)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, exc_type, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)
        assert exc_type is not None or not any(t.is_alive() for t in self._threads), "a request did not finish"

    def _loop(self, stream: int) -> None:
        client, cluster, max_tokens, pause_s = self._args
        n = stream
        while not self._stop.is_set():
            prompt = PROMPTS[n % len(PROMPTS)]
            n += 1
            started = time.monotonic()
            result = generate_remote(client, cluster, GenerateRequest(id=new_request_id(), prompt=prompt,
                                                                      max_tokens=max_tokens), timeout=60)
            self.done.append(Done(prompt, max_tokens, started, time.monotonic(), result))
            self._stop.wait(pause_s)


@contextlib.contextmanager
def start(model: Path, workdir: Path, cluster: str, share: float) -> Iterator[tuple[LocalCluster, MqttClient]]:
    nodes = [NodeSpec(name, mem_budget_mb=budget_mb(model, share)) for name in ("n1", "n2", "n3")]
    with LocalCluster(artifacts=model, nodes=nodes, workdir=workdir, cluster=cluster, objective="latency",
                      log_level="info") as c, MqttClient(url=c.url, client_id=f"test-{cluster}") as client:
        c.wait_ready(client, timeout=90)
        yield c, client


@pytest.mark.serial  # timings measured under other tests' load drift at random (failed in the parallel phase)
def test_a_node_slowed_mid_run_gets_fewer_pieces_and_no_request_is_lost(model, reference, tmp_path) -> None:
    # Each node holds ~55% of the model: two of the three are needed, one is idle.
    with start(model, tmp_path, "t-slowed", share=0.55) as (cluster, client):
        with PlanLog(cluster.url, cluster.cluster) as plans, \
                Load(client, cluster.cluster, streams=2, max_tokens=48) as load:
            time.sleep(3.0)  # the planner's first measurements (it corrects its probes' error)
            before = cluster.wait_ready(client, timeout=30)
            victim = max(before.stages, key=lambda s: (s.last - s.first, s.node)).node
            had = pieces_of(before, victim)
            client.publish(topics.NODE_CONTROL, topics.NODE_CONTROL.build(cluster.cluster, node=victim),
                           NodeControl(node=victim, slowdown=4.0), wait=5.0)
            found = plans.wait_for(lambda p: p.epoch > before.epoch and pieces_of(p, victim) < had, timeout=25)
            assert found, f"no new epoch took work from {victim}: {[p for _, p in plans.plans()][-3:]}\n" \
                          + cluster.log_tail("hub", 40)
            switched_at, after = found
            cluster.wait_ready(client, after_epoch=after.epoch - 1, timeout=30)
            time.sleep(1.0)  # requests admitted under the new epoch finish too
        assert load.done, "no request finished"
        spanning = [d for d in load.done if d.started < switched_at < d.ended]
        assert spanning, "no request was in flight during the switch"
        for done in load.done:
            assert done.result.error is None, done.result.error
            assert done.result.tokens == reference(model, done.prompt, done.max_tokens), done.prompt
    assert pieces_of(after, victim) < had


@pytest.mark.serial  # another test's load would drift the nodes' timings for real
def test_a_steady_cluster_publishes_no_new_epoch(model, reference, tmp_path) -> None:
    # Each node holds ~40% of the model: all three take part.
    with start(model, tmp_path, "t-steady", share=0.4) as (cluster, client):
        epoch = cluster.plan.epoch
        with PlanLog(cluster.url, cluster.cluster) as plans, \
                Load(client, cluster.cluster, streams=1, max_tokens=32, pause_s=0.2) as load:
            time.sleep(STEADY_S)
        seen = plans.plans()
    assert {p.epoch for _, p in seen} == {epoch}, [(p.epoch, p.reason) for _, p in seen]
    # The planner was measuring all along: the plan was re-published with measured figures.
    assert any(p.measured_ms_per_token is not None for _, p in seen)
    assert len(load.done) >= 10
    for done in load.done:
        assert done.result.error is None, done.result.error
        assert done.result.tokens == reference(model, done.prompt, done.max_tokens), done.prompt
