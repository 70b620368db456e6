"""Requests end to end on a hub and two node processes: seeds and cancelling.

A request that names no seed gets a fresh one, reported in its result, and that seed
replays the answer. A request left before its end (a Stream closed, Ctrl-C on
`linguamq generate`) is cancelled: its result says so and the nodes free its KV cache.
"""

from __future__ import annotations

import os
import queue
import select
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import linguamq
from linguamq import topics
from linguamq.client import new_request_id
from linguamq.schemas.cluster import Telemetry
from linguamq.schemas.requests import GenerateResult
from linguamq.tools.testing.cluster import LocalCluster, NodeSpec, linguamq_argv
from linguamq.topics.client import MqttClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLUSTER = "t-requests"
NODES = [NodeSpec("n1"), NodeSpec("n2")]
PROMPT = "Once upon a time"
LONG = 2000  # tokens: greedy, this prompt meets no EOS before (checked against run-local)
WAIT = 30.0


class Running:
    def __init__(self, cluster: LocalCluster, watcher: MqttClient, art: Path) -> None:
        self.cluster, self.watcher, self.art = cluster, watcher, art
        self.url = cluster.url

    def results_of(self, request: str) -> queue.Queue[GenerateResult]:
        """The final results published for ``request`` (an open-cluster request: `responses/{id}`)."""
        inbox: queue.Queue[GenerateResult] = queue.Queue()
        self.watcher.subscribe(topics.RESPONSES, topics.RESPONSES.build(CLUSTER, request=request),
                               lambda _t, v, _r: inbox.put(v) if isinstance(v, GenerateResult) else None, wait=WAIT)
        return inbox


@pytest.fixture(scope="module")
def running(artifacts, tmp_path_factory) -> Iterator[Running]:
    with LocalCluster(artifacts=artifacts["llama"], nodes=NODES, workdir=tmp_path_factory.mktemp("requests"),
                      cluster=CLUSTER, objective="even") as cluster, \
            MqttClient(url=cluster.url, client_id="test-requests") as watcher:
        cluster.wait_ready(watcher, nodes=len(NODES), timeout=90)
        yield Running(cluster, watcher, artifacts["llama"])


class Sessions:
    """The sessions each node (and the head) holds, from telemetry that arrives after ``mark()``."""

    def __init__(self, running: Running) -> None:
        self._held: dict[str, int] = {}
        self._changed = threading.Condition()
        self._client = running.watcher
        self._filters = (topics.NODE_TELEMETRY.filter(CLUSTER), topics.HUB_TELEMETRY.build(CLUSTER))
        self._client.subscribe(topics.NODE_TELEMETRY, self._filters[0], self._on_telemetry, wait=WAIT)
        self._client.subscribe(topics.HUB_TELEMETRY, self._filters[1], self._on_telemetry, wait=WAIT)

    def _on_telemetry(self, _topic: str, report: Telemetry, _retained: bool) -> None:
        with self._changed:
            self._held[report.node] = report.sessions
            self._changed.notify_all()

    def mark(self) -> None:
        with self._changed:
            self._held.clear()

    def wait_all_free(self, names: set[str]) -> dict[str, int]:
        """Wait until every one of ``names`` reported holding no session after the mark (or
        WAIT passed); returns what they last reported. A report may lag its node's work: the
        head publishes the result before the end, and a node whose queue still holds steps
        sent ahead by the ring reports them until it reaches the end."""
        with self._changed:
            self._changed.wait_for(lambda: all(self._held.get(name) == 0 for name in names), WAIT)
            return dict(self._held)

    def close(self) -> None:
        for name in self._filters:
            self._client.unsubscribe(name)


def test_unseeded_sampling_differs_each_time_and_its_reported_seed_replays_it(running: Running) -> None:
    with linguamq.Client(running.url, cluster=CLUSTER, timeout=WAIT) as client:
        first, second = (client.generate(PROMPT, max_tokens=24, temperature=1.0) for _ in range(2))
        assert first.seed is not None and second.seed is not None and first.seed != second.seed
        assert first.tokens != second.tokens  # 24 tokens sampled from ~500 at temperature 1
        replay = client.generate(PROMPT, max_tokens=24, temperature=1.0, seed=first.seed)
        assert (replay.tokens, replay.seed) == (first.tokens, first.seed)
        again = client.generate(PROMPT, max_tokens=24, temperature=1.0, seed=first.seed)
        assert again.tokens == first.tokens  # an explicit seed stays reproducible


def test_closing_a_stream_cancels_the_request_and_the_nodes_free_its_kv(running: Running, reference) -> None:
    assert len(reference(running.art, PROMPT, LONG)) == LONG  # left alone, it would run to the end
    sessions = Sessions(running)
    request_id = new_request_id()
    results = running.results_of(request_id)
    try:
        with linguamq.Client(running.url, cluster=CLUSTER, timeout=WAIT) as client:
            stream = client.stream(PROMPT, max_tokens=LONG, request_id=request_id)
            next(stream)  # generating
            stream.close()
            result = results.get(timeout=WAIT)
        assert result.stop_reason == "cancelled" and 0 < len(result.tokens) < LONG
        assert result.tokens == reference(running.art, PROMPT, LONG)[:len(result.tokens)]
        sessions.mark()
        held = sessions.wait_all_free({"n1", "n2", "head"})
        assert held == {"n1": 0, "n2": 0, "head": 0}  # the KV of every stage is freed
    finally:
        sessions.close()


def _ctrl_c_as_at_a_terminal() -> None:
    """A suite run as a background job has SIGINT ignored, and Python then leaves it ignored in
    its children (generate ran to its end and exited 0); a user at a terminal has Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_on_generate_cancels_the_request_and_exits_130(running: Running) -> None:
    request_id = new_request_id()
    results = running.results_of(request_id)
    proc = subprocess.Popen(linguamq_argv("--log-level", "warning", "generate", "--broker", running.url, "--cluster",
                                          CLUSTER, "--prompt", PROMPT, "--max-tokens", str(LONG), "--id", request_id),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            preexec_fn=_ctrl_c_as_at_a_terminal)
    try:
        assert proc.stdout is not None and select.select([proc.stdout], [], [], WAIT)[0], "no text from generate"
        assert os.read(proc.stdout.fileno(), 1)  # the stream has started
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=WAIT)
        assert proc.returncode == 130, err
        assert b"cancelled" in err
        result = results.get(timeout=WAIT)
        assert result.stop_reason == "cancelled" and len(result.tokens) < LONG
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
