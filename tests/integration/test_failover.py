"""A node killed mid-generation: its will fires, the planner replans without it, the head
re-prefills every in-flight session, and every request finishes with its run-local tokens."""

from __future__ import annotations

import concurrent.futures
import threading

import pytest

from linguamq.client import generate_remote, new_request_id
from linguamq.schemas.requests import GenerateRequest
from linguamq.tools.testing.cluster import LocalCluster, NodeSpec
from linguamq.topics.client import MqttClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PROMPTS = ["Hello world", "The quick brown fox", "MQTT carries tensors", "Once upon a time there was"]


def test_kill_9_a_node_during_four_generations(artifacts, reference, tmp_path) -> None:
    art = artifacts["llama"]
    # Slowed nodes keep the requests in flight long enough for the kill to land mid-way.
    nodes = [NodeSpec("n1", slowdown=3.0), NodeSpec("n2", slowdown=3.0), NodeSpec("n3", slowdown=3.0)]
    with LocalCluster(artifacts=art, nodes=nodes, workdir=tmp_path, cluster="t-failover", objective="even") as cluster, \
            MqttClient(url=cluster.url, client_id="test-failover") as client:
        plan = cluster.wait_ready(client, nodes=3, timeout=90)
        victim = plan.stages[1].node
        progressed = threading.Event()

        def generate(prompt: str):
            request = GenerateRequest(id=new_request_id(), prompt=prompt, max_tokens=48)
            return generate_remote(client, cluster.cluster, request, timeout=90, on_text=lambda _t: progressed.set())

        with concurrent.futures.ThreadPoolExecutor(len(PROMPTS)) as pool:
            futures = [pool.submit(generate, p) for p in PROMPTS]
            assert progressed.wait(30), "no token streamed before the kill"
            cluster.kill_node(victim)  # SIGKILL: no goodbye, only the will
            results = [f.result(timeout=120) for f in futures]
        assert all(not f.running() for f in futures)
        replanned = cluster.wait_ready(client, nodes=2, after_epoch=plan.epoch, timeout=30)
        assert victim not in {s.node for s in replanned.stages}
    for prompt, result in zip(PROMPTS, results):
        assert result.error is None, result.error
        assert result.tokens == reference(art, prompt, 48), prompt
