"""A node daemon in this process, on a broker in this process, fed by a stand-in hub
(manifest, assignments, a blob server): its control messages and the hops it stamps.

- A node whose activation queue is full still adopts a new assignment: the retained
  assignment is sent once, and a node that dropped it stayed on its old epoch.
- The tail's sampling is part of its stage in the trace, not of the transfer after it.
- The ring: the tail sends each next step to the first stage itself, none after EOS or the
  request's steps, one successor per (chain, step) whatever is redelivered; a newer chain (a
  retry) replaces the old one; an end stops the chain and frees the KV without a report; a
  silent head (its telemetry stopped) stops the chain; a failed step ahead loses no token.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import itertools
import queue
import statistics
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
from linguamq.schemas.cluster import Assignment, Segment, Telemetry
from linguamq.schemas.envelope import ActHeader
from linguamq.schemas.manifest import ModelManifest
from linguamq.schemas.requests import ErrorReport, Sampling
from linguamq.topics.client import MqttClient, MqttError

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
    yield from _cluster(artifacts, tmp_path, queue_size=2)


@pytest.fixture
def roomy(artifacts: tuple[Path, ModelManifest], tmp_path: Path) -> Iterator[Cluster]:
    """Node n1 (the default activation queue) ready on epoch 1."""
    yield from _cluster(artifacts, tmp_path, queue_size=NodeSettings(name="n1").queue_size)


def _cluster(artifacts: tuple[Path, ModelManifest], tmp_path: Path, *, queue_size: int,
             max_sessions: int = 0) -> Iterator[Cluster]:
    art, manifest = artifacts
    manifest_json = manifest.to_json()
    with BrokerThread() as broker, MqttClient(url=broker.url, client_id="hub") as hub, \
            MqttClient(url=broker.url, client_id="node-n1", will=status_will(CLUSTER, "n1")) as client:
        BlobServer(client=hub, cluster=CLUSTER, files={p.sha256: art / p.file for p in manifest.pieces},
                   reporter="hub").start()
        hub.publish(topics.MODEL, topics.MODEL.build(CLUSTER), manifest_json, wait=WAIT)
        node = NodeDaemon(client=client, settings=NodeSettings(name="n1", cluster=CLUSTER, cache_dir=tmp_path,
                                                               threads=1, spin=False, queue_size=queue_size,
                                                               max_sessions=max_sessions))
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


def test_chunks_of_a_prompt_the_node_lost_ask_for_one_re_prefill_not_one_each(roomy: Cluster) -> None:
    cluster = roomy  # chunks come in bursts: a queue of 2 refused some as overloaded
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
        chunk("s", start, more)
    wait_until(lambda: cluster.node._kv.length("s", 0) == 12)


# --- the ring: the tail sends the next step itself -------------------------------------------

class Wire:
    """What crosses act/0 and sessions/+/out, in the order this client receives it."""

    def __init__(self, cluster: Cluster) -> None:
        self.cluster, self._lock = cluster, threading.Lock()
        self.seen: list[tuple[str, ActHeader, int | None]] = []  # ("act" | "out", header, token of an out)
        self.reports: list[ErrorReport] = []
        hub = cluster.hub
        hub.subscribe(topics.ACT, topics.ACT.build(CLUSTER, piece=0), self._on("act"), wait=WAIT)
        hub.subscribe(topics.SESSION_OUT, topics.SESSION_OUT.filter(CLUSTER), self._on("out"), wait=WAIT)
        hub.subscribe(topics.ERRORS, topics.ERRORS.filter(CLUSTER), lambda _t, r, _r: self.reports.append(r),
                      wait=WAIT)

    def _on(self, kind: str):
        def handle(_topic: str, value: tuple[ActHeader, np.ndarray], _retained: bool) -> None:
            header, array = value
            with self._lock:
                self.seen.append((kind, header, int(array[0, 0]) if kind == "out" else None))
        return handle

    def send(self, session: str, *, step: int, start: int, ids: list[int], chain: int = 1, ring: int = 0,
             end: bool = False, sampling: Sampling | None = None) -> None:
        array = np.array([ids], dtype=np.int64)
        header = ActHeader.for_tensor(array, session=session, request=session, step=step, epoch=1, piece=0,
                                      start_pos=start, chain=chain, ring=ring, end=end, sampling=sampling)
        self.cluster.hub.publish(topics.ACT, topics.ACT.build(CLUSTER, piece=0), envelope.encode(header, array),
                                 wait=WAIT)

    def acts(self, session: str) -> list[ActHeader]:
        with self._lock:
            return [h for kind, h, _ in self.seen if kind == "act" and h.session == session and not h.end]

    def outs(self, session: str) -> list[tuple[ActHeader, int]]:
        with self._lock:
            return [(h, t) for kind, h, t in self.seen if kind == "out" and h.session == session and t is not None]

    def wait_out(self, session: str, step: int, chain: int = 1) -> None:
        """Until the session's output for (chain, step) arrived."""
        wait_until(lambda: any((h.chain, h.step) == (chain, step) for h, _ in self.outs(session)))


PROMPT = [3, 4, 5]
SAMPLED = Sampling(temperature=1.0, seed=11)  # sampling is a function of (seed, step): a wrong step shows


def test_the_tail_sends_each_next_step_itself_until_max_tokens(roomy: Cluster) -> None:
    wire = Wire(roomy)
    wire.send("r", step=0, start=0, ids=PROMPT, ring=4, sampling=SAMPLED)
    wire.wait_out("r", 3)
    # Each next step went out before the token that made it (nothing waits for a head), none after 3 ...
    assert [(h.step, h.start_pos, h.shape) for h in wire.acts("r")] == [(0, 0, (1, 3)), (1, 3, (1, 1)),
                                                                       (2, 4, (1, 1)), (3, 5, (1, 1))]
    with wire._lock:
        order = [(kind, h.step) for kind, h, _ in wire.seen if h.session == "r"]
    assert order == [("act", 0), ("act", 1), ("out", 0), ("act", 2), ("out", 1), ("act", 3), ("out", 2), ("out", 3)]
    ring = [t for _, t in wire.outs("r")]
    # ... and the tokens are those of steps sent one by one (the head's way, ring 0: nothing sent ahead)
    wire.send("h", step=0, start=0, ids=PROMPT, sampling=SAMPLED)
    wire.wait_out("h", 0)
    by_hand = [wire.outs("h")[0][1]]
    for k in range(1, 4):
        wire.send("h", step=k, start=len(PROMPT) + k - 1, ids=[by_hand[-1]], sampling=SAMPLED)
        wire.wait_out("h", k)
        by_hand.append(wire.outs("h")[-1][1])
    assert ring == by_hand
    assert [h.step for h in wire.acts("h")] == [0, 1, 2, 3]  # only the steps sent by hand


def test_no_step_follows_an_eos(roomy: Cluster) -> None:
    wire = Wire(roomy)
    roomy.node._eos = frozenset(range(roomy.manifest.vocab_size))  # whatever it samples is an EOS
    wire.send("e", step=0, start=0, ids=PROMPT, ring=4)
    wire.wait_out("e", 0)  # a step sent ahead would have crossed act/0 before this output
    assert [h.step for h in wire.acts("e")] == [0]


def test_a_redelivered_step_does_not_start_a_second_chain(roomy: Cluster) -> None:
    wire = Wire(roomy)
    for _ in range(2):  # QoS 1 delivers the step twice: both run, one successor
        wire.send("d", step=0, start=0, ids=PROMPT, ring=6)
    wire.wait_out("d", 5)
    assert collections.Counter(h.step for h in wire.acts("d")) == {0: 2, 1: 1, 2: 1, 3: 1, 4: 1, 5: 1}


def test_a_retry_replaces_the_chain_it_retries(roomy: Cluster) -> None:
    wire = Wire(roomy)
    wire.send("c", step=0, start=0, ids=PROMPT, chain=1, ring=8)
    wire.send("c", step=0, start=0, ids=PROMPT, chain=2, ring=8)  # the head's re-prefill of the same step
    wire.wait_out("c", 7, chain=2)
    outs = wire.outs("c")
    chains = [h.chain for h, _ in outs]
    assert chains == sorted(chains), chains  # the old chain stopped once the new one ran
    assert [h.step for h, _ in outs if h.chain == 2] == list(range(8))
    tokens = {h.step: t for h, t in outs if h.chain == 2}
    assert all(tokens[h.step] == t for h, t in outs)  # both chains sampled the same tokens
    assert roomy.node.duplicates >= 1  # the old chain's next step, dropped


def test_an_end_stops_the_chain_and_frees_the_kv_without_a_report(roomy: Cluster) -> None:
    wire = Wire(roomy)
    wire.send("x", step=0, start=0, ids=PROMPT, ring=50)
    wire.wait_out("x", 2)
    dropped = roomy.node.duplicates
    # The head ends the session at the step it saw last, older than the tail's: a stop string, a cancel.
    wire.send("x", step=1, start=0, ids=[], end=True)
    wait_until(lambda: roomy.node.duplicates > dropped)  # the chain's next step, dropped after the end
    wait_until(lambda: "x" not in roomy.node._kv.sessions())
    wire.send("m", step=0, start=0, ids=PROMPT)  # a marker: whatever "x" had queued is done before it
    wire.wait_out("m", 0)
    assert len(wire.outs("x")) < 50 and not [r for r in wire.reports if r.ref == "x"]


class HubTelemetry:
    """The stand-in hub's heartbeat on hub/telemetry (the head's, every ~1 s; here faster)."""

    def __init__(self, cluster: Cluster, interval_s: float) -> None:
        self.cluster, self.interval_s = cluster, interval_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=WAIT)

    def _beat(self) -> None:
        seq = 0
        while not self._stop.wait(self.interval_s):
            seq += 1
            self.cluster.hub.publish(topics.HUB_TELEMETRY, topics.HUB_TELEMETRY.build(CLUSTER),
                                     Telemetry(node="head", ts=time.time(), seq=seq, epoch=1))


def test_a_silent_heads_chain_stops_and_a_retry_resumes_it(roomy: Cluster) -> None:
    node, wire = roomy.node, Wire(roomy)
    node.settings = dataclasses.replace(node.settings, head_silence_s=0.5)
    gate = threading.Semaphore(0)  # the test lets the node run one step at a time
    node._emulate_slowdown = lambda _compute_s: gate.acquire(timeout=WAIT)  # type: ignore[method-assign]
    beat = HubTelemetry(roomy, interval_s=0.05)
    beat.start()
    try:
        wait_until(lambda: node._head_seen is not None)
        wire.send("q", step=0, start=0, ids=PROMPT, ring=30)
        for step in range(3):  # the head speaks: the tail sends each next step
            gate.release()
            wire.wait_out("q", step)
        beat.stop()
        wait_until(node._head_silent)
        gate.release()  # step 3, sent ahead while the head spoke, runs: its successor stays home
        wire.wait_out("q", 3)
        assert [h.step for h in wire.acts("q")] == [0, 1, 2, 3]  # step 4 would have crossed act/0 before out 3
        tokens = [t for _, t in wire.outs("q")]
        beat.start()  # the head was only slow: its retry (a re-prefill, a new chain) resumes the session
        wait_until(lambda: not node._head_silent())
        gate.release(3)
        wire.send("q", step=4, start=0, ids=PROMPT + tokens, chain=2, ring=30)
        wire.wait_out("q", 6, chain=2)
    finally:
        beat.stop()
        gate.release(100)


def test_a_failed_step_ahead_still_sends_the_token(roomy: Cluster) -> None:
    wire, client = Wire(roomy), roomy.node._client
    publish = client.publish

    def refuse_steps(topic: topics.Topic, name: str, payload, **kw) -> None:
        if topic is topics.ACT:
            raise MqttError("publish refused (a broker blip)")
        publish(topic, name, payload, **kw)

    client.publish = refuse_steps  # type: ignore[method-assign]
    try:
        wire.send("f", step=0, start=0, ids=PROMPT, ring=4)
        wait_until(lambda: wire.outs("f") or wire.reports)
    finally:
        client.publish = publish  # type: ignore[method-assign]
    assert [h.step for h, _ in wire.outs("f")] == [0]  # the head has its token; its retry sends step 1


PROMPTS = {"a": [3, 4, 5], "b": [6, 7, 8, 9], "c": [10, 11], "x": list(range(1, 41))}  # x: max_context


class Held:
    """The node's worker held before it takes the envelopes queued behind its first one."""

    def __init__(self, node: NodeDaemon, behind: int) -> None:
        self.node, self.behind, self.gate, self.take_more = node, behind, threading.Event(), node._more_acts

    def __enter__(self) -> Held:
        self.node._more_acts = lambda first: (self.gate.wait(WAIT), self.take_more(first))[1]
        return self

    def __exit__(self, *exc: object) -> None:
        wait_until(lambda: self.node._work.qsize() == self.behind)
        self.gate.set()


def test_steps_waiting_together_run_as_one_batch_each_as_alone_and_a_stale_one_drops_out(roomy: Cluster) -> None:
    wire, node = Wire(roomy), roomy.node
    for session in ("a", "b", "c", "a1", "b1", "c1"):  # twins: the same steps one by one
        wire.send(session, step=0, start=0, ids=PROMPTS[session[0]], sampling=SAMPLED)
        wire.wait_out(session, 0)
    first = {s: wire.outs(s)[0][1] for s in ("a", "b", "c")}
    stale = ActHeader.for_tensor(np.array([[first["b"]]]), session="b", request="b", step=1, epoch=0, piece=0,
                                 start_pos=len(PROMPTS["b"]), sampling=SAMPLED)
    with Held(node, behind=2):
        wire.send("a", step=1, start=3, ids=[first["a"]], sampling=SAMPLED)
        roomy.hub.publish(topics.ACT, topics.ACT.build(CLUSTER, piece=0),
                          envelope.encode(stale, np.array([[first["b"]]])), wait=WAIT)
        wire.send("c", step=1, start=2, ids=[first["c"]], sampling=SAMPLED)
    wire.wait_out("a", 1)
    wire.wait_out("c", 1)
    node._more_acts = Held(node, 0).take_more
    assert [(b.rows, b.runs) for b in node._batches.values()] == [(2, 1)]  # a and c: one call (b's row a dummy)
    wait_until(lambda: any(r.code == "stale_epoch" and r.ref == "b" for r in wire.reports))
    assert not [h for h, _ in wire.outs("b") if h.step == 1]  # b dropped out alone ...
    wire.send("b", step=1, start=4, ids=[first["b"]], sampling=SAMPLED)  # ... its cache untouched
    for session, start in (("a", 3), ("b", 4), ("c", 2)):
        twin = f"{session}1"
        wire.send(twin, step=1, start=start, ids=[first[session]], sampling=SAMPLED)
        wire.wait_out(session, 1)
        wire.wait_out(twin, 1)
        assert [t for h, t in wire.outs(session) if h.step == 1] == [t for h, t in wire.outs(twin) if h.step == 1]


def test_a_batch_with_a_step_at_fault_runs_the_others_one_by_one(roomy: Cluster) -> None:
    wire, node = Wire(roomy), roomy.node
    for session in ("a", "a1", "x"):
        wire.send(session, step=0, start=0, ids=PROMPTS[session[0]], sampling=SAMPLED)
        wire.wait_out(session, 0)
    first = {s: wire.outs(s)[0][1] for s in ("a", "x")}
    with Held(node, behind=1):
        wire.send("x", step=1, start=40, ids=[first["x"]], sampling=SAMPLED)  # past max_context (40)
        wire.send("a", step=1, start=3, ids=[first["a"]], sampling=SAMPLED)
    wire.send("a1", step=1, start=3, ids=[first["a"]], sampling=SAMPLED)
    wire.wait_out("a", 1)
    wire.wait_out("a1", 1)
    node._more_acts = Held(node, 0).take_more
    assert [t for h, t in wire.outs("a") if h.step == 1] == [t for h, t in wire.outs("a1") if h.step == 1]
    wait_until(lambda: any(r.code == "bad_request" and r.ref == "x" and "max_context" in r.message
                           for r in wire.reports))
    assert not node._batches  # the batch did not run: each alone


@pytest.mark.parametrize("behind", [1, 0])
def test_a_step_that_says_its_batch_follows_waits_for_it(roomy: Cluster, monkeypatch: pytest.MonkeyPatch,
                                                         behind: int) -> None:
    """A batch upstream sends its rows one message each; the first says how many follow, and
    an idle stage waits for them (here up to 2 s: the second comes 0.3 s later) to run them as
    one batch again. A step that says nothing follows runs at once, alone."""
    monkeypatch.setattr(node_daemon, "SIBLING_WAIT_S", 2.0)
    wire, node = Wire(roomy), roomy.node
    for session in ("a", "c"):
        wire.send(session, step=0, start=0, ids=PROMPTS[session], sampling=SAMPLED)
        wire.wait_out(session, 0)
    node._active.update({"a": time.monotonic(), "c": time.monotonic()})  # two sessions in flight: batches of 2
    first = {s: wire.outs(s)[0][1] for s in ("a", "c")}
    for session, start, rows_behind in (("a", 3, behind), ("c", 2, 0)):
        array = np.array([[first[session]]], dtype=np.int64)
        header = ActHeader.for_tensor(array, session=session, request=session, step=1, epoch=1, piece=0,
                                      start_pos=start, chain=1, sampling=SAMPLED, behind=rows_behind)
        roomy.hub.publish(topics.ACT, topics.ACT.build(CLUSTER, piece=0), envelope.encode(header, array), wait=WAIT)
        time.sleep(0.3)
    wire.wait_out("a", 1)
    wire.wait_out("c", 1)
    assert [(b.rows, b.runs) for b in node._batches.values()] == ([(2, 1)] if behind else [])


def test_a_prompt_counts_as_busy_time_not_as_a_decode_steps_time(roomy: Cluster) -> None:
    """The telemetry's per-segment EWMA is what the planner compares with its decode-step
    prediction: a prompt's many positions in it would read as a slower node (a drift, a replan)."""
    wire, node = Wire(roomy), roomy.node
    busy = node._busy_ms
    wire.send("x", step=0, start=0, ids=PROMPTS["x"][:30], sampling=SAMPLED)
    wire.wait_out("x", 0)
    assert node._busy_ms > busy and not node._timings  # ran, and timed as no decode step
    token = wire.outs("x")[0][1]
    wire.send("x", step=1, start=30, ids=[token], sampling=SAMPLED)
    wire.wait_out("x", 1)
    assert [t.runs for t in node._timings.values()] == [1]


@pytest.fixture
def capped(artifacts: tuple[Path, ModelManifest], tmp_path: Path) -> Iterator[Cluster]:
    """Node n1 with --max-sessions 2, ready on epoch 1."""
    yield from _cluster(artifacts, tmp_path, queue_size=NodeSettings(name="n1").queue_size, max_sessions=2)


def test_new_sessions_waiting_in_one_batch_count_against_max_sessions(capped: Cluster) -> None:
    wire, node = Wire(capped), capped.node
    wire.send("a", step=0, start=0, ids=[3], sampling=SAMPLED)
    wire.wait_out("a", 0)
    with Held(node, behind=2):  # three one-token prompts: decode-shaped, batched together
        for session in ("b", "c", "d"):
            wire.send(session, step=0, start=0, ids=[5], sampling=SAMPLED)
    wire.wait_out("b", 0)
    node._more_acts = Held(node, 0).take_more
    wait_until(lambda: {r.ref for r in wire.reports if r.code == "overloaded"} == {"c", "d"})
    assert set(node._kv.sessions()) == {"a", "b"} and not wire.outs("c") and not wire.outs("d")


def test_the_telemetry_says_what_a_session_step_costs_besides_its_compute(roomy: Cluster) -> None:
    """Telemetry.row_ms: the node's CPU per session step outside its compute (the messages in
    and out, the sampling), which a batch does not share and the planner adds per session of
    a batch (Profile.row_ms). Rounds of four sessions whose tail sends each next step itself
    (they meet in batches) until a report carries it: more than nothing, and less than the
    two threads that do that work (the worker, paho's) can spend in the steps' time."""
    wire, reports = Wire(roomy), []
    roomy.hub.subscribe(topics.NODE_TELEMETRY, topics.NODE_TELEMETRY.build(CLUSTER, node="n1"),
                        lambda _t, report, _r: reports.append(report), wait=WAIT)
    steps, per_step, deadline = 30, [], time.monotonic() + WAIT

    def finished(session: str) -> bool:
        return len(wire.outs(session)) == steps or any(t in roomy.manifest.eos_token_ids
                                                       for _, t in wire.outs(session))
    for k in itertools.count():
        if any(r.row_ms is not None for r in reports) or time.monotonic() > deadline:
            break
        started, sessions = time.monotonic(), [f"r{k}-{i}" for i in range(4)]
        for session in sessions:
            wire.send(session, step=0, start=0, ids=PROMPT, ring=steps)
        wait_until(lambda: all(finished(s) for s in sessions))  # noqa: B023 (waited for here)
        per_step.append((time.monotonic() - started) * 1e3 / sum(len(wire.outs(s)) for s in sessions))
    measured = [r.row_ms for r in reports if r.row_ms is not None]
    assert measured, "no telemetry report measured a step's cost"
    assert 0 < measured[0] < 2 * statistics.median(per_step)
