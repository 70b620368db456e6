"""A node daemon in this process, on a broker in this process, fed by a stand-in hub
(manifest, assignments, a blob server): its control messages and the hops it stamps.

- A node whose activation queue is full still adopts a new assignment: the retained
  assignment is sent once, and a node that dropped it stayed on its old epoch.
- The tail's sampling is part of its stage in the trace, not of the transfer after it.
"""

from __future__ import annotations

import hashlib
import queue
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from linguamq import topics
from linguamq.broker import BrokerThread
from linguamq.hub.blobs import BlobServer
from linguamq.node import daemon as node_daemon
from linguamq.node.daemon import NodeDaemon, NodeSettings, status_will
from linguamq.node.runtime import MERGED_DIR
from linguamq.schemas import envelope
from linguamq.schemas.cluster import Assignment, Segment
from linguamq.schemas.envelope import ActHeader
from linguamq.schemas.manifest import ModelManifest
from linguamq.schemas.requests import ErrorReport
from linguamq.topics.client import MqttClient

pytestmark = pytest.mark.integration
CLUSTER = "t-node"
WAIT = 30.0


class Cluster:
    def __init__(self, hub: MqttClient, node: NodeDaemon, manifest: ModelManifest, sha: str) -> None:
        self.hub, self.node, self.manifest, self.sha = hub, node, manifest, sha

    def assign(self, epoch: int) -> None:
        """The whole model on the node (it is the tail)."""
        segment = Segment(first=0, last=len(self.manifest.pieces) - 1, next_piece=None)
        self.hub.publish(topics.NODE_ASSIGN, topics.NODE_ASSIGN.build(CLUSTER, node="n1"),
                         Assignment(node="n1", epoch=epoch, manifest_sha256=self.sha, segments=(segment,)),
                         wait=WAIT)

    def act(self, session: str, epoch: int = 1) -> None:
        ids = np.array([[3, 4, 5]], dtype=np.int64)  # (1, 3)
        header = ActHeader.for_tensor(ids, session=session, request=session, step=0, epoch=epoch, piece=0,
                                      start_pos=0)
        self.hub.publish(topics.ACT, topics.ACT.build(CLUSTER, piece=0), envelope.encode(header, ids), wait=WAIT)


def wait_until(predicate, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.fixture
def cluster(artifacts: tuple[Path, ModelManifest], tmp_path: Path) -> Iterator[Cluster]:
    """Node n1 (an activation queue of 2) ready on epoch 1."""
    art, manifest = artifacts
    manifest_json = manifest.to_json()
    with BrokerThread() as broker, MqttClient(url=broker.url, client_id="hub") as hub, \
            MqttClient(url=broker.url, client_id="node-n1", will=status_will(CLUSTER, "n1")) as client:
        BlobServer(client=hub, cluster=CLUSTER, files={p.sha256: art / p.file for p in manifest.pieces},
                   reporter="hub").start()
        hub.publish(topics.MODEL, topics.MODEL.build(CLUSTER), manifest_json, wait=WAIT)
        node = NodeDaemon(client=client, settings=NodeSettings(name="n1", cluster=CLUSTER, cache_dir=tmp_path,
                                                               threads=1, spin=False, queue_size=2))
        running = Cluster(hub, node, manifest, hashlib.sha256(manifest_json).hexdigest())
        running.assign(epoch=1)
        node.start()
        try:
            wait_until(lambda: node.epoch == 1 and node.state == "ready")
            yield running
        finally:
            node.stop()


def test_a_node_whose_activation_queue_is_full_still_adopts_a_new_assignment(cluster: Cluster) -> None:
    node, hub = cluster.node, cluster.hub
    reports: queue.Queue[ErrorReport] = queue.Queue()
    hub.subscribe(topics.ERRORS, topics.ERRORS.filter(CLUSTER), lambda _t, r, _r: reports.put(r), wait=WAIT)
    busy, release = threading.Event(), threading.Event()

    def stuck(_compute_s: float) -> None:  # a slow device: the worker stays in its first step
        busy.set()
        release.wait(WAIT)

    node._emulate_slowdown = stuck  # type: ignore[method-assign]
    try:
        cluster.act("s0")
        assert busy.wait(WAIT)
        cluster.act("s1")
        cluster.act("s2")  # the queue of 2 is full
        cluster.assign(epoch=2)
        cluster.act("s3")  # refused: the assignment before it was handled by then
        while (report := reports.get(timeout=WAIT)).ref != "s3":
            pass
        assert report.code == "overloaded"
    finally:
        release.set()
    wait_until(lambda: node.epoch == 2 and node.state == "ready")


def test_a_sessions_end_that_finds_the_queue_full_still_frees_its_kv(cluster: Cluster) -> None:
    """A cancelled or finished session's `end` envelope must free the node's KV even when it
    arrives while the work queue is full (it used to be dropped as `overloaded`)."""
    node = cluster.node
    busy, release = threading.Event(), threading.Event()

    def stuck(_compute_s: float) -> None:
        busy.set()
        release.wait(WAIT)

    s1_out: queue.Queue[object] = queue.Queue()
    cluster.hub.subscribe(topics.SESSION_OUT, topics.SESSION_OUT.build(CLUSTER, session="s1"),
                          lambda _t, value, _r: s1_out.put(value), wait=WAIT)
    try:
        cluster.act("s1")
        s1_out.get(timeout=WAIT)  # s1's step is over (its output is sent after the slowdown hook) ...
        assert "s1" in node._kv.sessions()  # ... and s1 holds KV here
        node._emulate_slowdown = stuck  # type: ignore[method-assign]  # s2 is the first step it stalls
        cluster.act("s2")
        assert busy.wait(WAIT)
        cluster.act("s3")
        cluster.act("s4")  # the queue of 2 is full
        empty = np.zeros((1, 0), dtype=np.int64)
        end = ActHeader.for_tensor(empty, session="s1", request="s1", step=0, epoch=1, piece=0, start_pos=0,
                                   end=True)
        cluster.hub.publish(topics.ACT, topics.ACT.build(CLUSTER, piece=0), envelope.encode(end, empty), wait=WAIT)
        time.sleep(0.2)  # let the end reach the node while it is still stuck (no assertion rests on this)
    finally:
        release.set()
    wait_until(lambda: {"s2", "s3", "s4"} <= set(node._kv.sessions()))  # the queued work ran...
    wait_until(lambda: "s1" not in node._kv.sessions())  # ...and the end freed s1's KV


def test_a_new_assignment_leaves_only_its_own_merged_layers_on_disk(cluster: Cluster) -> None:
    """Merged layers are a copy of a segment's weights: a node that moves on deletes its old
    copy (and only its own: nodes on one machine share the cache directory), then still answers."""
    node = cluster.node
    merged = node.settings.cache_dir / MERGED_DIR / "n1"
    other_node = node.settings.cache_dir / MERGED_DIR / "n2"
    other_node.mkdir(parents=True)
    (other_node / "layers-0-2-0000000000000000.onnx").write_bytes(b"n2's")

    def files() -> list[list[str]]:
        return [p.name.split("-")[1:3] for p in sorted(merged.iterdir())]

    assert files() == [["0", "2"]] * 3  # layers 0-2: the graph, its weights, its checksum
    segments = (Segment(first=0, last=2, next_piece=3), Segment(first=3, last=4, next_piece=None))
    cluster.hub.publish(topics.NODE_ASSIGN, topics.NODE_ASSIGN.build(CLUSTER, node="n1"),
                        Assignment(node="n1", epoch=2, manifest_sha256=cluster.sha, segments=segments), wait=WAIT)
    wait_until(lambda: node.epoch == 2 and node.state == "ready")
    assert files() == [["0", "1"]] * 3  # layers 0-1 merged; layer 2 alone in its segment
    assert [p.name for p in other_node.iterdir()] == ["layers-0-2-0000000000000000.onnx"]
    outputs: queue.Queue[object] = queue.Queue()
    cluster.hub.subscribe(topics.SESSION_OUT, topics.SESSION_OUT.build(CLUSTER, session="s9"),
                          lambda _t, value, _r: outputs.put(value), wait=WAIT)
    cluster.act("s9", epoch=2)
    assert outputs.get(timeout=WAIT)  # through both segments: the node answers


def test_the_tails_sampling_is_in_its_stage_not_in_the_transfer(cluster: Cluster,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    sampled: list[tuple[float, float]] = []
    real_sample = node_daemon.sample

    def slow_sample(*args, **kwargs) -> int:  # a slow sampler: its time must show in the stage
        t0 = time.time()
        time.sleep(0.05)
        token = real_sample(*args, **kwargs)
        sampled.append((t0, time.time()))
        return token

    monkeypatch.setattr(node_daemon, "sample", slow_sample)
    outputs: queue.Queue[tuple[ActHeader, float]] = queue.Queue()
    cluster.hub.subscribe(topics.SESSION_OUT, topics.SESSION_OUT.build(CLUSTER, session="s1"),
                          lambda _t, value, _r: outputs.put((value[0], time.time())), wait=WAIT)
    cluster.act("s1")
    header, t_out = outputs.get(timeout=WAIT)
    (hop,) = header.hops
    ((s0, s1),) = sampled
    assert hop.t_recv <= hop.t_start <= s0  # sampling ran inside the stage's compute ...
    assert s1 <= hop.t_end <= hop.t_send <= t_out  # ... and before its output was sent


def test_chunks_of_a_prompt_the_node_lost_ask_for_one_re_prefill_not_one_each(cluster: Cluster) -> None:
    reports: queue.Queue[ErrorReport] = queue.Queue()
    cluster.hub.subscribe(topics.ERRORS, topics.ERRORS.filter(CLUSTER), lambda _t, r, _r: reports.put(r), wait=WAIT)

    def chunk(session: str, start: int, more: bool) -> None:
        ids = np.array([[3, 4, 5]], dtype=np.int64)
        header = ActHeader.for_tensor(ids, session=session, request=session, step=0, epoch=1, piece=0,
                                      start_pos=start, more=more)
        cluster.hub.publish(topics.ACT, topics.ACT.build(CLUSTER, piece=0), envelope.encode(header, ids), wait=WAIT)

    for start, more in ((3, True), (6, True), (9, False)):  # chunks 2.. of a prompt whose first chunk was lost
        chunk("s", start, more)
    chunk("z", 3, False)  # another session's loss, reported after everything of "s"
    seen = []
    while not seen or seen[-1].ref != "z":
        seen.append(reports.get(timeout=WAIT))
    assert [(r.ref, r.code) for r in seen] == [("s", "unknown_session"), ("z", "unknown_session")]
    for start, more in ((0, True), (3, True), (6, True), (9, False)):  # the re-prefill runs whole
        chunk("s", start, more)  # one at a time: this node's work queue holds 2
        wait_until(lambda end=start + 3: cluster.node._kv.length("s", 0) == end)
