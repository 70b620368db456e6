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


def describe_failures(art: Path, sent: list[Sent]) -> str:
    bad = [s for s in sent if s.result is None or s.result.error is not None
           or s.result.tokens != reference(art, s.prompt, s.max_tokens)]
    return "; ".join((s.failure or (s.result.error if s.result and s.result.error else "tokens differ"))[:160]
                     for s in bad[:3])


def cluster_of(ctx: ChaosContext, name: str, nodes: list[NodeSpec], **kwargs) -> LocalCluster:
    return LocalCluster(artifacts=ctx.artifacts, nodes=nodes, workdir=ctx.workdir / name, cluster=name,
                        objective="even", settle_s=0.5, log_level="info", **kwargs)


# --- node kill -9 ----------------------------------------------------------------------------------


def node_kill(ctx: ChaosContext) -> Outcome:
    n, max_tokens = (20, 48) if ctx.full else (6, 32)
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
    same = identical(ctx.artifacts, sent)
    nxt = first_event_after(sent, t_kill)
    ok = same == n and victim not in {s.node for s in replanned.stages}
    return Outcome(case="node kill -9",
                   injected=f"kill -9 of {victim} (random of 3, even split) during {n} concurrent requests",
                   observed=f"{same}/{n} token-identical to run-local; replanned on 2 nodes (epoch {plan.epoch} -> "
                            f"{replanned.epoch})" + ("" if ok else f"; {describe_failures(ctx.artifacts, sent)}"),
                   figure=(f"longest wait for a token {longest_stall(sent, t_kill):.2f} s (next token {nxt:.2f} s "
                           "after the kill)") if nxt is not None else "no token after the kill",
                   ok=ok)


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


def no_plan_fits(ctx: ChaosContext) -> Outcome:
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
    same = identical(ctx.artifacts, sent)
    clear = [s for s in sent if s.result is not None and s.result.error and "no plan fits" in s.result.error]
    ended_s = t_done - t_kill
    ok = (same + len(clear) == n and len(clear) > 0 and after.error is not None and "no plan fits" in after.error
          and ended_s < 30)
    example = clear[0].result.error if clear else describe_failures(ctx.artifacts, sent)
    return Outcome(case="no plan fits",
                   injected=f"kill -9 of {victim} during {n} requests; each node's --mem-budget {budget:.3f} MB "
                            f"holds a third of the model, not half",
                   observed=f"{same} finished token-identical before the kill, {len(clear)} ended with a clear "
                            f"error, 0 hung; a new request refused in {refused_s:.2f} s: \"{example[:140]}\"",
                   figure=f"every request ended {ended_s:.1f} s after the kill", ok=ok)


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


def node_freeze(ctx: ChaosContext) -> Outcome:
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
    same = identical(ctx.artifacts, sent_all)
    nxt = first_event_after(sent, t_cont)
    resumed = f"next token {nxt:.2f} s after SIGCONT" if nxt is not None else "no token after SIGCONT"
    ok = same == len(sent_all) and worked > 0
    return Outcome(case="node SIGSTOP",
                   injected=f"SIGSTOP of {victim} (a middle stage) for {freeze_s:g} s during {n} requests, "
                            "then SIGCONT",
                   observed=f"{same}/{len(sent_all)} token-identical (2 sent after the thaw); {victim} ran {worked} "
                            f"steps after the thaw; epoch {plan.epoch} -> {epochs}"
                            + ("" if ok else f"; {describe_failures(ctx.artifacts, sent_all)}"),
                   figure=f"{resumed} (stalled {t_cont - t_stop:.1f} s)", ok=ok)


# --- hub restart ---------------------------------------------------------------------------------------


def hub_restart(ctx: ChaosContext) -> Outcome:
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
    same = identical(ctx.artifacts, sent)
    nxt = first_event_after(sent, t_ready)
    resends = sum(s.resends for s in sent)
    back = [v for v in reconnect.values() if v is not None]
    ok = (same == n and len(back) == len(nodes) and max(back) <= 5.0 and replanned.epoch > plan.epoch)
    worst = f"{max(back):.1f}" if back else "-"
    return Outcome(case="hub restart",
                   injected=f"kill -9 of the hub (broker, planner, head) during {n} requests; a new hub on the same "
                            f"port",
                   observed=f"{same}/{n} resumed token-identical ({resends} re-sent requests); nodes back "
                            + ", ".join(f"{k} {v:.1f} s" if v is not None else f"{k} never"
                                        for k, v in sorted(reconnect.items()))
                            + f"; epoch {plan.epoch} -> {replanned.epoch}"
                            + ("" if ok else f"; {describe_failures(ctx.artifacts, sent)}"),
                   figure=f"nodes reconnected within {worst} s of the new broker; first new token "
                          + (f"{nxt:.1f} s after it was up" if nxt is not None else "never")
                          + f" (hub down {ready_wall - wall_kill:.1f} s)", ok=ok)


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
            self._client.subscribe_raw(filter_, lambda msg, k=kind: self._on(k, msg), qos=1, wait=10.0)
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


def duplicates(ctx: ChaosContext) -> Outcome:
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
    ok = same == n and repeated == 0 and skipped == 0 and copies["act"] > 0 and copies["out"] > 0
    return Outcome(case="duplicated deliveries",
                   injected=f"every act/ and sessions/ envelope delivered 3 times (again at once, and 0.2 s late) "
                            f"during {n} concurrent requests: {copies['act']} act + {copies['out']} out copies",
                   observed=f"{same}/{n} token-identical; {repeated} repeated and {skipped} skipped/wrong streamed "
                            "tokens" + ("" if ok else f"; {describe_failures(ctx.artifacts, sent)}"),
                   figure=f"{repeated + skipped} duplicated or skipped tokens", ok=ok)


CASES = [Case("node kill -9", node_kill), Case("no plan fits", no_plan_fits), Case("node SIGSTOP", node_freeze),
         Case("hub restart", hub_restart), Case("duplicated deliveries", duplicates)]
