"""Node and hub faults, and duplicated deliveries, on a real local cluster (issue 7, 1-2).

Each case starts a LocalCluster (hub + 3 node processes, even split so every node holds a
stage), sends concurrent greedy requests, injects its fault mid-generation and compares
every result with run-local's tokens:

- node kill -9: a random node dies; its will fires, the planner replans on the two left,
  the head re-prefills every session;
- no plan fits: the same kill, but the two nodes left cannot hold the model (their
  --mem-budget): every request still running ends at once with a clear error;
- node SIGSTOP: a node freezes (a phone out of Wi-Fi range) and thaws; the head's step
  retry re-sends what was lost, the node's backlog of old steps is dropped, and the node
  computes steps again afterwards;
- hub restart: hub (broker, planner, head) killed and started again on the same port;
  nodes reconnect and re-publish their status, the new planner continues the epoch count,
  clients re-publish their requests and skip the text they already have;
- duplicated deliveries: every activation and every tail output is delivered two more
  times (at once, and late, after later steps), as QoS 1 redelivery may.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import hashlib
import heapq
import random
import signal
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho

from linguamq import topics
from linguamq.client import generate_remote, new_request_id
from linguamq.schemas import envelope
from linguamq.schemas.cluster import NodeStatus
from linguamq.schemas.manifest import ModelManifest
from linguamq.schemas.requests import GenerateRequest, GenerateResult, TokenEvent
from linguamq.tools.chaos.case import Case, ChaosContext, Outcome
from linguamq.tools.testing.cluster import LocalCluster, NodeSpec
from linguamq.tools.testing.followers import Follower
from linguamq.topics.client import MqttClient

SUBJECTS = ["the quick brown fox", "MQTT carries tensors", "once upon a time", "a phone in a drawer",
            "the planner splits the model", "hello world"]
_REFERENCE: dict[tuple[str, str, int], tuple[int, ...]] = {}
_LOCAL: dict[str, object] = {}


def prompts(n: int) -> list[str]:
    """``n`` distinct prompts."""
    return [f"Request {i}: {SUBJECTS[i % len(SUBJECTS)]}" for i in range(n)]


def reference(art: Path, prompt: str, max_tokens: int) -> tuple[int, ...]:
    """run-local's greedy tokens (cached)."""
    from linguamq.node.runtime import RuntimeSettings
    from linguamq.tools.local import generate_local, open_local
    key = (str(art), prompt, max_tokens)
    if key not in _REFERENCE:
        local = _LOCAL.setdefault(str(art), open_local(art, RuntimeSettings(intra_op_threads=1,
                                                                             allow_spinning=False)))
        ids = local.tokenizer.encode(prompt).ids  # type: ignore[attr-defined]
        _REFERENCE[key] = generate_local(local.runtime, prompt_ids=ids, max_tokens=max_tokens,  # type: ignore
                                         eos_token_ids=local.manifest.eos_token_ids).tokens  # type: ignore
    return _REFERENCE[key]


@dataclasses.dataclass
class Sent:
    prompt: str
    max_tokens: int
    events: list[float] = dataclasses.field(default_factory=list)  # monotonic arrival of new text
    resends: int = 0
    result: GenerateResult | None = None
    failure: str | None = None  # an exception (timeout): the request hung or was lost


class Load:
    """Concurrent requests through one client; ``wait_streaming`` blocks until text flows."""

    def __init__(self, client: MqttClient, cluster: str, prompts_: list[str], max_tokens: int,
                 timeout: float = 120.0) -> None:
        self.sent = [Sent(p, max_tokens) for p in prompts_]
        self._client, self._cluster, self._timeout = client, cluster, timeout
        self._pool = concurrent.futures.ThreadPoolExecutor(len(prompts_))
        self._streaming = threading.Event()
        self._futures = [self._pool.submit(self._one, s) for s in self.sent]

    def _one(self, sent: Sent) -> None:
        def on_text(_text: str) -> None:
            sent.events.append(time.monotonic())
            self._streaming.set()

        def on_resend() -> None:
            sent.resends += 1

        request = GenerateRequest(id=new_request_id(), prompt=sent.prompt, max_tokens=sent.max_tokens)
        try:
            sent.result = generate_remote(self._client, self._cluster, request, on_text=on_text,
                                          on_resend=on_resend, timeout=self._timeout)
        except Exception as exc:  # reported as a lost request
            sent.failure = f"{type(exc).__name__}: {exc}"

    def wait_streaming(self, timeout: float = 60.0) -> None:
        if not self._streaming.wait(timeout):
            raise RuntimeError(f"no text streamed within {timeout:.0f} s")

    def finish(self, timeout: float = 240.0) -> list[Sent]:
        concurrent.futures.wait(self._futures, timeout=timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
        for sent, future in zip(self.sent, self._futures):
            if not future.done():
                sent.failure = sent.failure or f"still running after {timeout:.0f} s"
        return self.sent


def identical(art: Path, sent: list[Sent]) -> int:
    return sum(1 for s in sent if s.result is not None and s.result.error is None
               and s.result.tokens == reference(art, s.prompt, s.max_tokens))


def first_event_after(sent: list[Sent], t: float) -> float | None:
    """Seconds from ``t`` to the first new text of any request after it."""
    after = [e for s in sent for e in s.events if e > t]
    return min(after) - t if after else None


def longest_stall(sent: list[Sent], t: float) -> float:
    """The longest wait for a token that any request saw from ``t`` on (``t`` to its first
    event included): the pause a user notices."""
    gaps = [0.0]
    for s in sent:
        times = [t] + [e for e in s.events if e > t]
        gaps += [b - a for a, b in zip(times, times[1:])]
    return max(gaps)


def interrupted(sent: list[Sent], before: float, after: float) -> int:
    """Requests that streamed text before ``before`` and again after ``after``: the fault
    between them hit them mid-generation."""
    return sum(1 for s in sent if any(e < before for e in s.events) and any(e > after for e in s.events))


def failures(art: Path, sent: list[Sent]) -> tuple[str, ...]:
    """What went wrong with the first three requests that are not token-identical."""
    bad = [s for s in sent if s.result is None or s.result.error is not None
           or s.result.tokens != reference(art, s.prompt, s.max_tokens)]
    return tuple((s.failure or (s.result.error if s.result and s.result.error else "tokens differ"))[:160]
                 for s in bad[:3])


def cluster_of(ctx: ChaosContext, name: str, nodes: list[NodeSpec], **kwargs) -> LocalCluster:
    return LocalCluster(artifacts=ctx.artifacts, nodes=nodes, workdir=ctx.workdir / name, cluster=name,
                        objective="even", settle_s=0.5, log_level="info", **kwargs)


# --- node kill -9 ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class KillCounts:
    requests: int
    identical: int  # finished token-identical to run-local
    interrupted: int  # streaming when the node died, and again after
    plan_nodes: int  # nodes in the plan made after the kill
    victim_in_plan: bool
    epoch_before: int
    epoch_after: int

    @property
    def ok(self) -> bool:
        return self.identical == self.requests and not self.victim_in_plan

    def observed(self) -> str:
        return (f"{self.identical}/{self.requests} token-identical to run-local ({self.interrupted} interrupted "
                f"mid-stream); replanned on {self.plan_nodes} nodes (epoch {self.epoch_before} -> {self.epoch_after})")


def node_kill(ctx: ChaosContext) -> Outcome[KillCounts]:
    n, max_tokens = (20, 48) if ctx.full else (16, 24)
    nodes = [NodeSpec(f"n{i}", slowdown=3.0) for i in (1, 2, 3)]
    with cluster_of(ctx, "c-kill", nodes) as cluster, MqttClient(url=cluster.url, client_id="chaos-kill") as client:
        plan = cluster.wait_ready(client, nodes=3, timeout=120)
        victim = random.Random(time.time_ns()).choice([s.node for s in plan.stages])
        load = Load(client, cluster.cluster, prompts(n), max_tokens)
        load.wait_streaming()
        t_kill = time.monotonic()
        cluster.kill_node(victim)
        ctx.log(f"node kill -9: killed {victim} during {n} requests")
        sent = load.finish()
        replanned = cluster.wait_ready(client, nodes=2, after_epoch=plan.epoch, timeout=60)
    left = {s.node for s in replanned.stages}
    counts = KillCounts(requests=n, identical=identical(ctx.artifacts, sent),
                        interrupted=interrupted(sent, t_kill, t_kill), plan_nodes=len(left),
                        victim_in_plan=victim in left, epoch_before=plan.epoch, epoch_after=replanned.epoch)
    nxt = first_event_after(sent, t_kill)
    return Outcome(case="node kill -9",
                   injected=f"kill -9 of {victim} (random of 3, even split) during {n} concurrent requests",
                   counts=counts, problems=failures(ctx.artifacts, sent),
                   figure=(f"longest wait for a token {longest_stall(sent, t_kill):.2f} s (next token {nxt:.2f} s "
                           "after the kill)") if nxt is not None else "no token after the kill")


# --- no plan fits -------------------------------------------------------------------------------------


def stage_mb(manifest: ModelManifest, nodes: int) -> float:
    """The largest stage's weights (MB) of the even split over ``nodes`` nodes."""
    base, extra = divmod(len(manifest.pieces), nodes)
    first, most = 0, 0.0
    for i in range(nodes):
        size = base + (1 if i < extra else 0)
        most = max(most, sum(p.bytes for p in manifest.pieces[first:first + size]) / 2**20)
        first += size
    return most


NO_PLAN = "no plan fits"  # the start of the head's error when no placement fits the nodes online


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoFitCounts:
    requests: int
    identical: int  # finished token-identical (before the kill)
    clear: int  # ended with the head's "no plan fits ..." error
    hung: int  # never got a result
    ended_s: float  # from the kill to the end of the last request
    example: str  # the first clear error (or what went wrong)
    late_error: str | None  # the result's error of a request sent after the kill
    late_s: float  # how long that request took

    @property
    def ok(self) -> bool:
        return (self.identical + self.clear == self.requests and self.clear > 0 and self.ended_s < 30
                and NO_PLAN in (self.late_error or ""))

    def observed(self) -> str:
        other = self.requests - self.identical - self.clear - self.hung
        late = (f"a new request refused in {self.late_s:.2f} s" if NO_PLAN in (self.late_error or "")
                else f"a new request: {self.late_error or 'served'}")
        return (f"{self.identical} finished token-identical before the kill, {self.clear} ended with a clear error, "
                f"{self.hung} hung" + (f", {other} failed otherwise" if other else "")
                + f"; {late}: \"{self.example[:140]}\"")


def no_plan_fits(ctx: ChaosContext) -> Outcome[NoFitCounts]:
    n, max_tokens = (20, 48) if ctx.full else (4, 32)
    manifest = ModelManifest.from_json((ctx.artifacts / "manifest.json").read_bytes())
    three, two = stage_mb(manifest, 3), stage_mb(manifest, 2)
    if not three < two:
        raise RuntimeError(f"model too small to split: stages of {three:.3f} MB on 3 nodes, {two:.3f} MB on 2")
    budget = (three + two) / 2  # three nodes hold the model, two cannot
    nodes = [NodeSpec(f"n{i}", slowdown=3.0, mem_budget_mb=round(budget, 4)) for i in (1, 2, 3)]
    with cluster_of(ctx, "c-nofit", nodes) as cluster, MqttClient(url=cluster.url, client_id="chaos-nofit") as client:
        plan = cluster.wait_ready(client, nodes=3, timeout=120)
        victim = plan.stages[1].node
        load = Load(client, cluster.cluster, prompts(n), max_tokens)
        load.wait_streaming()
        t_kill = time.monotonic()
        cluster.kill_node(victim)
        ctx.log(f"no plan fits: killed {victim}; the two left have {budget:.3f} MB each, {two:.3f} MB needed")
        sent = load.finish(timeout=90)
        t_done = time.monotonic()
        late = GenerateRequest(id=new_request_id(), prompt="after the kill", max_tokens=4)
        t0 = time.monotonic()
        after = generate_remote(client, cluster.cluster, late, timeout=30)
        refused_s = time.monotonic() - t0
    clear = [s.result.error for s in sent if s.result is not None and s.result.error and NO_PLAN in s.result.error]
    counts = NoFitCounts(requests=n, identical=identical(ctx.artifacts, sent), clear=len(clear),
                         hung=sum(1 for s in sent if s.result is None), ended_s=t_done - t_kill,
                         example=clear[0] if clear else "; ".join(failures(ctx.artifacts, sent)),
                         late_error=after.error, late_s=refused_s)
    return Outcome(case="no plan fits",
                   injected=f"kill -9 of {victim} during {n} requests; each node's --mem-budget {budget:.3f} MB "
                            f"holds a third of the model, not half",
                   counts=counts, figure=f"every request ended {counts.ended_s:.1f} s after the kill")


# --- node SIGSTOP ------------------------------------------------------------------------------------


class Hops(Follower):
    """Every stage visit of every tail output (`sessions/+/out` envelopes carry one Hop per stage)."""

    def __init__(self, url: str, cluster: str) -> None:
        super().__init__(url, f"hops-{cluster}", topics.SESSION_OUT, topics.SESSION_OUT.filter(cluster))
        self.hops: list[envelope.Hop] = []

    def _on(self, _t: str, value, _r: bool) -> None:
        with self._lock:
            self.hops.extend(value[0].hops)

    def computed_by(self, node: str, after: float) -> int:
        """Stage visits of ``node`` whose compute started after wall-clock time ``after``."""
        with self._lock:
            return sum(1 for h in self.hops if h.node == node and h.t_start > after)


@dataclasses.dataclass(frozen=True, kw_only=True)
class FreezeCounts:
    requests: int  # those running during the freeze and those sent after the thaw
    identical: int  # finished token-identical to run-local
    after_thaw: int  # requests sent after the thaw
    interrupted: int  # streaming before the freeze, and again after the thaw
    victim: str
    steps_after_thaw: int  # stage visits the frozen node computed after the thaw
    epoch_before: int
    epoch_after: int

    @property
    def ok(self) -> bool:
        return self.identical == self.requests and self.steps_after_thaw > 0

    def observed(self) -> str:
        return (f"{self.identical}/{self.requests} token-identical ({self.after_thaw} sent after the thaw, "
                f"{self.interrupted} interrupted mid-stream); {self.victim} ran {self.steps_after_thaw} steps after "
                f"the thaw; epoch {self.epoch_before} -> {self.epoch_after}")


def node_freeze(ctx: ChaosContext) -> Outcome[FreezeCounts]:
    n, max_tokens, freeze_s = (8, 48, 10.0) if ctx.full else (4, 32, 4.0)
    nodes = [NodeSpec(f"n{i}", slowdown=3.0) for i in (1, 2, 3)]
    with cluster_of(ctx, "c-freeze", nodes) as cluster, \
            MqttClient(url=cluster.url, client_id="chaos-freeze") as client, Hops(cluster.url, "c-freeze") as hops:
        plan = cluster.wait_ready(client, nodes=3, timeout=120)
        victim = plan.stages[1].node
        load = Load(client, cluster.cluster, prompts(n), max_tokens)
        load.wait_streaming()
        cluster.kill_node(victim, signal.SIGSTOP)
        t_stop = time.monotonic()
        ctx.log(f"node SIGSTOP: froze {victim} for {freeze_s:g} s during {n} requests")
        time.sleep(freeze_s)
        cluster.kill_node(victim, signal.SIGCONT)
        t_cont, wall_cont = time.monotonic(), time.time()
        sent = load.finish()
        # The node is back in the pipeline: a fresh request after the freeze goes through it too.
        again = Load(client, cluster.cluster, prompts(2), 8).finish(timeout=60)
        sent_all = sent + again
        worked = hops.computed_by(victim, wall_cont)
        epochs = cluster.wait_ready(client, timeout=30).epoch
    counts = FreezeCounts(requests=len(sent_all), identical=identical(ctx.artifacts, sent_all),
                          after_thaw=len(again), interrupted=interrupted(sent, t_stop, t_cont), victim=victim,
                          steps_after_thaw=worked, epoch_before=plan.epoch, epoch_after=epochs)
    nxt = first_event_after(sent, t_cont)
    resumed = f"next token {nxt:.2f} s after SIGCONT" if nxt is not None else "no token after SIGCONT"
    return Outcome(case="node SIGSTOP",
                   injected=f"SIGSTOP of {victim} (a middle stage) for {freeze_s:g} s during {n} requests, "
                            "then SIGCONT",
                   counts=counts, problems=failures(ctx.artifacts, sent_all),
                   figure=f"{resumed} (stalled {t_cont - t_stop:.1f} s)")


# --- hub restart ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class HubRestartCounts:
    requests: int
    identical: int  # finished token-identical to run-local
    interrupted: int  # streaming before the hub died, and again after the new one was up
    resends: int  # requests the clients published again after reconnecting
    reconnect_s: dict[str, float | None]  # node -> seconds from the new broker to its status (None: never)
    epoch_before: int
    epoch_after: int

    @property
    def nodes_back(self) -> int:
        return sum(1 for s in self.reconnect_s.values() if s is not None)

    @property
    def ok(self) -> bool:
        slowest = max((s for s in self.reconnect_s.values() if s is not None), default=None)
        return (self.identical == self.requests and self.nodes_back == len(self.reconnect_s)
                and slowest is not None and slowest <= 5.0 and self.epoch_after > self.epoch_before)

    def observed(self) -> str:
        back = ", ".join(f"{k} {v:.1f} s" if v is not None else f"{k} never" for k, v in sorted(self.reconnect_s.items()))
        return (f"{self.identical}/{self.requests} resumed token-identical ({self.resends} re-sent requests, "
                f"{self.interrupted} interrupted mid-stream); nodes back {back}; epoch {self.epoch_before} -> "
                f"{self.epoch_after}")


def hub_restart(ctx: ChaosContext) -> Outcome[HubRestartCounts]:
    n, max_tokens = (8, 48) if ctx.full else (3, 32)
    nodes = [NodeSpec(f"n{i}", slowdown=3.0) for i in (1, 2, 3)]
    with cluster_of(ctx, "c-hub", nodes) as cluster:
        client = MqttClient(url=cluster.url, client_id="chaos-hub").start()
        try:
            plan = cluster.wait_ready(client, nodes=3, timeout=120)
            load = Load(client, cluster.cluster, prompts(n), max_tokens, timeout=60)
            load.wait_streaming()
            t_kill, wall_kill = time.monotonic(), time.time()
            ready_wall = cluster.restart_hub(signal.SIGKILL)
            t_ready = time.monotonic()
            ctx.log(f"hub restart: hub killed and back in {t_ready - t_kill:.1f} s")
            reconnect = node_reconnects(cluster, [s.name for s in nodes], ready_wall, timeout=15)
            sent = load.finish(timeout=180)
            replanned = cluster.wait_ready(client, nodes=3, timeout=60)
        finally:
            client.stop()
    counts = HubRestartCounts(requests=n, identical=identical(ctx.artifacts, sent),
                              interrupted=interrupted(sent, t_kill, t_ready), resends=sum(s.resends for s in sent),
                              reconnect_s=reconnect, epoch_before=plan.epoch, epoch_after=replanned.epoch)
    nxt = first_event_after(sent, t_ready)
    back = [v for v in reconnect.values() if v is not None]
    worst = f"{max(back):.1f}" if back else "-"
    return Outcome(case="hub restart",
                   injected=f"kill -9 of the hub (broker, planner, head) during {n} requests; a new hub on the same "
                            f"port",
                   counts=counts, problems=failures(ctx.artifacts, sent),
                   figure=f"nodes reconnected within {worst} s of the new broker; first new token "
                          + (f"{nxt:.1f} s after it was up" if nxt is not None else "never")
                          + f" (hub down {ready_wall - wall_kill:.1f} s)")


def node_reconnects(cluster: LocalCluster, names: list[str], since: float, timeout: float) -> dict[str, float | None]:
    """Seconds from ``since`` (wall clock) to each node's status on the new broker (a node
    re-publishes it after reconnecting; the status carries its send time)."""
    seen: dict[str, float | None] = {name: None for name in names}
    done = threading.Event()

    def on_status(_t: str, status: NodeStatus, _r: bool) -> None:
        if status.node in seen and seen[status.node] is None and status.state != "offline" and status.ts >= since - 30:
            seen[status.node] = max(0.0, status.ts - since)
            if all(v is not None for v in seen.values()):
                done.set()

    with MqttClient(url=cluster.url, client_id="chaos-reconnect") as watcher:
        watcher.subscribe(topics.NODE_STATUS, topics.NODE_STATUS.filter(cluster.cluster), on_status, wait=10.0)
        done.wait(timeout)
    return seen


# --- duplicated deliveries ----------------------------------------------------------------------------


class Duplicator:
    """Publishes every activation and tail output twice more: at once, and ``late_s`` later
    (after later steps of the same session), as a QoS 1 redelivery may arrive."""

    def __init__(self, url: str, cluster: str, late_s: float) -> None:
        self._client = MqttClient(url=url, client_id=f"dup-{cluster}")
        self._cluster, self._late = cluster, late_s
        self._seen: set[bytes] = set()
        self._due: list[tuple[float, int, str, bytes]] = []
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._drain, name="duplicator", daemon=True)
        self.copies = {"act": 0, "out": 0}

    def __enter__(self) -> Duplicator:
        self._client.start()
        self._thread.start()
        filters = (("act", topics.ACT.filter(self._cluster)), ("out", topics.SESSION_OUT.filter(self._cluster)))
        for kind, filter_ in filters:
            self._client.subscribe_raw(filter_, functools.partial(self._on, kind), qos=1, wait=10.0)
        return self

    def __exit__(self, *exc: object) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=5)
        self._client.stop()

    def _on(self, kind: str, msg: paho.MQTTMessage) -> None:
        digest = hashlib.blake2b(msg.payload, digest_size=16).digest()
        with self._cv:
            if digest in self._seen:  # our own copy coming back
                return
            self._seen.add(digest)
            now = time.monotonic()
            for delay in (0.0, self._late):
                heapq.heappush(self._due, (now + delay, len(self._seen) * 2 + int(delay > 0), msg.topic,
                                           bytes(msg.payload)))
                self.copies[kind] += 1
            self._cv.notify()

    def _drain(self) -> None:
        while True:
            with self._cv:
                while not self._stop and (not self._due or self._due[0][0] > time.monotonic()):
                    self._cv.wait(timeout=max(0.001, self._due[0][0] - time.monotonic()) if self._due else None)
                if self._stop:
                    return
                _, _, topic, payload = heapq.heappop(self._due)
            self._client.publish_raw(topic, payload, qos=1)


class Responses(Follower):
    """Every TokenEvent of every request, raw (not through generate_remote's resume filter)."""

    def __init__(self, url: str, cluster: str) -> None:
        super().__init__(url, f"resp-{cluster}", topics.RESPONSES, topics.RESPONSES.filter(cluster))
        self.events: dict[str, list[TokenEvent]] = {}

    def _on(self, _t: str, value, _r: bool) -> None:
        if isinstance(value, TokenEvent):
            with self._lock:
                self.events.setdefault(value.request, []).append(value)


@dataclasses.dataclass(frozen=True, kw_only=True)
class DuplicateCounts:
    requests: int
    identical: int  # finished token-identical to run-local
    act_copies: int  # extra deliveries of activations
    out_copies: int  # extra deliveries of tail outputs
    repeated: int  # streamed tokens out of order or twice
    skipped: int  # requests whose stream missed a token or streamed a wrong one

    @property
    def ok(self) -> bool:
        return (self.identical == self.requests and self.repeated == self.skipped == 0
                and self.act_copies > 0 and self.out_copies > 0)

    def observed(self) -> str:
        return (f"{self.identical}/{self.requests} token-identical; {self.repeated} repeated and {self.skipped} "
                "skipped/wrong streamed tokens")


def duplicates(ctx: ChaosContext) -> Outcome[DuplicateCounts]:
    n, max_tokens = (20, 48) if ctx.full else (4, 32)
    nodes = [NodeSpec(f"n{i}") for i in (1, 2, 3)]
    with cluster_of(ctx, "c-dup", nodes) as cluster, MqttClient(url=cluster.url, client_id="chaos-dup") as client:
        cluster.wait_ready(client, nodes=3, timeout=120)
        with Duplicator(cluster.url, cluster.cluster, late_s=0.2) as dup, \
                Responses(cluster.url, cluster.cluster) as raw:
            sent = Load(client, cluster.cluster, prompts(n), max_tokens).finish()
            time.sleep(0.5)  # the last late copies
        copies = dict(dup.copies)
        events = {k: list(v) for k, v in raw.events.items()}
    same = identical(ctx.artifacts, sent)
    repeated = skipped = 0
    for s in sent:
        if s.result is None:
            continue
        got = events.get(s.result.request, [])
        repeated += sum(1 for a, b in zip(got, got[1:])  # out of order, or the same token twice
                        if b.index < a.index or (b.index == a.index and b.text == a.text))
        text = "".join(e.text for e in got)
        skipped += int(not s.result.text.startswith(text) or any(e.token != s.result.tokens[e.index] for e in got))
    counts = DuplicateCounts(requests=n, identical=same, act_copies=copies["act"], out_copies=copies["out"],
                             repeated=repeated, skipped=skipped)
    return Outcome(case="duplicated deliveries",
                   injected=f"every act/ and sessions/ envelope delivered 3 times (again at once, and 0.2 s late) "
                            f"during {n} concurrent requests: {copies['act']} act + {copies['out']} out copies",
                   counts=counts, problems=failures(ctx.artifacts, sent),
                   figure=f"{repeated + skipped} duplicated or skipped tokens")


CASES = [Case("node kill -9", node_kill), Case("no plan fits", no_plan_fits), Case("node SIGSTOP", node_freeze),
         Case("hub restart", hub_restart), Case("duplicated deliveries", duplicates)]
