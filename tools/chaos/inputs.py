"""Hostile input, limits and soak: the cases of issue 7 points 3, 4 and 6.

- ``hostile_input``: a 2-node cluster; for every topic a node, the head or the planner
  follows, malformed payloads (schemas/fuzz.py) while valid requests keep flowing. Checked:
  every process alive, every valid request token-identical to run-local, RSS bounded, each
  payload answered by exactly one ErrorReport per follower that must refuse it, and every
  rejection counted in its reporter's telemetry (`Telemetry.rejected`; the hub's head
  publishes its own, planner included, on `hub/telemetry`).
- ``limits``: payload size (client and broker), sessions per node, KV cap, max_tokens,
  per-client rate: each refused with a clear error, other requests unaffected.
- ``soak`` (slow): 500 requests over 10 minutes on 3 nodes: none lost, none wrong, RSS of
  every node and of the broker within 10% between warm-up and the end.

Nothing here publishes retained: a retained payload on `model` or `plan` would replace
the cluster's own.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from linguamq import topics
from linguamq.client import generate_remote, new_request_id
from linguamq.schemas import examples, fuzz
from linguamq.schemas.cluster import Assignment, ClockPing, NodeControl, NodeStatus, Plan, Telemetry
from linguamq.schemas.manifest import ModelManifest
from linguamq.schemas.requests import CancelRequest, ErrorReport, GenerateRequest, GenerateResult
from linguamq.tools.chaos.case import Case, ChaosContext, Outcome
from linguamq.tools.testing.cluster import LocalCluster, NodeSpec
from linguamq.topics.client import MqttClient, MqttError, PayloadTooLarge

PROMPTS = ("Hello world", "The quick brown fox", "MQTT carries tensors", "Once upon a time")
NEW_TOKENS = 8
NODE_LIMIT_MB = 1.0  # the nodes' --max-envelope-mb in hostile_input: "oversized" items sit just over it
HEAD = "head"


# --- shared helpers ----------------------------------------------------------------------


def reference_tokens(art: Path, prompts: tuple[str, ...], max_tokens: int) -> dict[str, tuple[int, ...]]:
    """run-local's greedy tokens for each prompt (the truth every distributed answer must equal)."""
    from linguamq.tools.local import generate_local, open_local
    local = open_local(art)
    return {p: generate_local(local.runtime, prompt_ids=local.tokenizer.encode(p).ids, max_tokens=max_tokens,
                              eos_token_ids=local.manifest.eos_token_ids).tokens for p in prompts}


def rss_mb(pid: int) -> float:
    """VmRSS of a live process, from /proc (0.0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def children(pid: int) -> list[int]:
    """Child pids of ``pid`` (the hub's broker process is one)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def processes(cluster: LocalCluster) -> dict[str, int]:
    """name -> pid of every process of a local cluster: nodes, the hub and its broker."""
    assert cluster.hub is not None, "the cluster is not running"
    procs = {name: p.pid for name, p in cluster.node_procs.items()}
    procs["hub"] = cluster.hub.pid
    for i, pid in enumerate(children(cluster.hub.pid)):
        procs["broker" if i == 0 else f"hub-child{i}"] = pid
    return procs


def alive(cluster: LocalCluster) -> dict[str, bool]:
    state = {name: p.poll() is None for name, p in cluster.node_procs.items()}
    state["hub"] = cluster.hub is not None and cluster.hub.poll() is None
    return state


class Watcher:
    """Follows `errors/+`, `nodes/+/telemetry` and `hub/telemetry` of a cluster: reports counted by
    (reporter, topic), the latest `rejected` of each telemetry sender."""

    def __init__(self, client: MqttClient, cluster: str) -> None:
        self.reports: collections.Counter[tuple[str, str]] = collections.Counter()
        self.by_reporter: collections.Counter[str] = collections.Counter()
        self.codes: collections.Counter[tuple[str, str]] = collections.Counter()
        self.rejected: dict[str, int] = {}
        self.samples: list[ErrorReport] = []
        self._lock = threading.Lock()
        ignore = lambda *_: None  # noqa: E731 - malformed payloads on errors/+ are the fuzzer's own
        client.subscribe(topics.ERRORS, topics.ERRORS.filter(cluster), self._on_report, on_reject=ignore, wait=10)
        for topic in (topics.NODE_TELEMETRY, topics.HUB_TELEMETRY):
            client.subscribe(topic, topic.filter(cluster), self._on_telemetry, on_reject=ignore, wait=10)

    def _on_report(self, _topic: str, report: ErrorReport, _retained: bool) -> None:
        with self._lock:
            self.reports[(report.reporter, report.topic)] += 1
            self.by_reporter[report.reporter] += 1
            self.codes[(report.reporter, report.code)] += 1
            if len(self.samples) < 2000:
                self.samples.append(report)

    def _on_telemetry(self, _topic: str, report: Telemetry, _retained: bool) -> None:
        with self._lock:
            self.rejected[report.node] = report.rejected

    def count(self, reporter: str, topic: str) -> int:
        with self._lock:
            return self.reports[(reporter, topic)]


class Traffic:
    """Valid requests in a loop on its own connection, until stopped; each result checked
    against run-local."""

    def __init__(self, url: str, cluster: str, expected: dict[str, tuple[int, ...]], *, name: str,
                 concurrency: int = 2, pause_s: float = 0.0, limit: int | None = None) -> None:
        self._url, self._cluster, self._expected, self._name = url, cluster, expected, name
        self._concurrency, self._pause, self._limit = concurrency, pause_s, limit
        self.ok = self.wrong = self.failed = 0
        self.errors: list[str] = []
        self._sent = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._client: MqttClient | None = None

    def __enter__(self) -> Traffic:
        self._client = MqttClient(url=self._url, client_id=f"traffic-{self._name}").start()
        for i in range(self._concurrency):
            thread = threading.Thread(target=self._loop, args=(i,), daemon=True, name=f"traffic-{i}")
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self, timeout: float = 120.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
        if self._client is not None:
            self._client.stop()
            self._client = None

    def wait(self, timeout: float) -> None:
        """Until ``limit`` requests are done (or ``timeout``)."""
        for thread in self._threads:
            thread.join(timeout)

    @property
    def done(self) -> int:
        return self.ok + self.wrong + self.failed

    def _loop(self, i: int) -> None:
        client = self._client
        assert client is not None, "start() first"
        prompts = list(self._expected)
        while not self._stop.is_set():
            with self._lock:
                if self._limit is not None and self._sent >= self._limit:
                    return
                self._sent += 1
                prompt = prompts[(self._sent + i) % len(prompts)]
            request = GenerateRequest(id=new_request_id(), prompt=prompt, max_tokens=NEW_TOKENS, client=self._name)
            try:
                result = generate_remote(client, self._cluster, request, timeout=120)
            except MqttError as exc:
                result = None
                error = f"{request.id}: {exc}"
            with self._lock:
                if result is None:
                    self.failed += 1
                    self.errors.append(error)
                elif result.error is not None:
                    self.failed += 1
                    self.errors.append(f"{request.id}: {result.error}")
                elif result.tokens != self._expected[prompt]:
                    self.wrong += 1
                    self.errors.append(f"{request.id}: tokens {result.tokens} != run-local {self._expected[prompt]}")
                else:
                    self.ok += 1
            if self._pause:
                self._stop.wait(self._pause)


@contextlib.contextmanager
def running(ctx: ChaosContext, name: str, nodes: list[NodeSpec], hub_args: tuple[str, ...] = ()
            ) -> Iterator[tuple[LocalCluster, MqttClient, Plan]]:
    workdir = ctx.workdir / name
    with LocalCluster(artifacts=ctx.artifacts, nodes=nodes, workdir=workdir, cluster=name, objective="even",
                      hub_args=hub_args) as cluster, \
            MqttClient(url=cluster.url, client_id=f"chaos-{name}") as client:
        plan = cluster.wait_ready(client, nodes=len(nodes), timeout=120)
        yield cluster, client, plan


# --- hostile input -----------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    topic: str
    payloads: Callable[[int], Iterator[fuzz.Fuzz]]  # n -> that many malformed payloads
    reporters: tuple[str, ...]  # who must answer each with exactly one ErrorReport (none: nobody follows it)


def targets(cluster: str, plan: Plan, manifest: ModelManifest, nodes: list[str], seed: int) -> list[Target]:
    """Every topic a node, the head or the planner follows, with its malformed payloads."""
    limit = int(NODE_LIMIT_MB * 2**20)
    sha = manifest.pieces[0].sha256
    out = [Target(topics.MODEL.build(cluster), lambda n: fuzz.json_payloads(ModelManifest, n, seed=seed),
                  tuple(nodes))]
    for node in nodes:
        out += [
            Target(topics.NODE_ASSIGN.build(cluster, node=node),
                   lambda n: fuzz.json_payloads(Assignment, n, seed=seed), (node,)),
            Target(topics.NODE_CONTROL.build(cluster, node=node),
                   lambda n: fuzz.json_payloads(NodeControl, n, seed=seed), (node,)),
            Target(topics.PING.build(cluster, node=node), lambda n: fuzz.json_payloads(ClockPing, n, seed=seed),
                   (node,)),
            # followed only while a node profiles its link / fetches a piece: nobody answers now
            Target(topics.NODE_PROBE.build(cluster, node=node),
                   lambda n: fuzz.frame_payloads("envelope", n, seed=seed, limit=limit), ()),
            Target(topics.BLOB_CHUNK.build(cluster, sha256=sha, node=node),
                   lambda n: fuzz.frame_payloads("blob_chunk", n, seed=seed), ()),
        ]
    for stage in plan.stages:
        def act(n: int, first: int = stage.first) -> Iterator[fuzz.Fuzz]:
            framed = fuzz.frame_payloads("envelope", n - n // 2, seed=seed, limit=limit)
            semantic = fuzz.act_payloads(n // 2, seed=seed, epoch=plan.epoch, piece=first, takes_ids=first == 0,
                                         hidden=manifest.hidden_size)
            for a, b in zip(framed, semantic):
                yield a
                yield b
            yield from framed
        out.append(Target(topics.ACT.build(cluster, piece=stage.first), act, (stage.node,)))
    out += [
        Target(topics.REQUESTS.build(cluster), lambda n: fuzz.json_payloads(GenerateRequest, n, seed=seed), (HEAD,)),
        Target(topics.CANCEL.build(cluster), lambda n: fuzz.json_payloads(CancelRequest, n, seed=seed), (HEAD,)),
        Target(topics.SESSION_OUT.build(cluster, session="fz-out"),
               lambda n: fuzz.frame_payloads("envelope", n, seed=seed), (HEAD,)),
        Target(topics.ERRORS.build(cluster, client="fz-err"), lambda n: fuzz.json_payloads(ErrorReport, n, seed=seed),
               (HEAD,)),
        Target(topics.PLAN.build(cluster), lambda n: fuzz.json_payloads(Plan, n, seed=seed), ("planner",)),
        Target(topics.NODE_STATUS.build(cluster, node="fz-node"),
               lambda n: fuzz.json_payloads(NodeStatus, n, seed=seed), ("planner",)),
        Target(topics.NODE_TELEMETRY.build(cluster, node="fz-node"),
               lambda n: fuzz.json_payloads(Telemetry, n, seed=seed), ("planner",)),
    ]
    for topic, cls in ((topics.NODE_STATUS, NodeStatus), (topics.NODE_TELEMETRY, Telemetry)):
        # a node id that breaks the topic rules: valid payloads too are refused (they cannot be its)
        out.append(Target(topic.filter(cluster).replace("+", "bad id!"),
                          functools.partial(_valid_and_malformed, cls, seed=seed), ("planner",)))
    return out


def _valid_and_malformed(cls: type[NodeStatus] | type[Telemetry], n: int, seed: int) -> Iterator[fuzz.Fuzz]:
    valid = fuzz.Fuzz(f"valid {cls.TYPE}", examples.EXAMPLES[cls].to_json())
    for i, item in enumerate(fuzz.json_payloads(cls, n - n // 2, seed=seed)):
        yield item
        if i < n // 2:
            yield valid


@dataclasses.dataclass(frozen=True, kw_only=True)
class HostileCounts:
    topics: int  # followed topics fuzzed
    per_topic: int  # malformed payloads on each
    sent: int  # malformed payloads published in all
    dead: tuple[str, ...]  # processes of the cluster that died
    valid_identical: int  # valid requests meanwhile, token-identical to run-local
    valid_wrong: int
    valid_failed: int
    reports: int  # ErrorReports on errors/, every reporter
    codes: dict[str, int]  # ErrorReports by code
    misanswered: int  # (topic, follower) pairs not answered exactly once per payload
    reported: dict[str, int]  # reporter -> its ErrorReports (the planner's under the head, whose telemetry has them)
    counted: dict[str, int]  # reporter -> the rejections its telemetry counted meanwhile
    rss_before_mb: dict[str, float]  # process -> RSS before the payloads
    rss_after_mb: dict[str, float]

    @property
    def rss_bounded(self) -> bool:
        return all(self.rss_after_mb[k] <= 1.25 * self.rss_before_mb[k] + 32 for k in self.rss_before_mb)

    @property
    def ok(self) -> bool:
        return (not self.dead and self.valid_identical > 0 and self.valid_wrong == self.valid_failed == 0
                and self.misanswered == 0 and self.codes.get("internal", 0) == 0 and self.reported == self.counted
                and self.rss_bounded)

    def observed(self) -> str:
        alive = f"dead: {', '.join(self.dead)}" if self.dead else "processes alive"
        once = ("exactly one per refusal and follower" if not self.misanswered
                else f"{self.misanswered} topic/follower pairs not answered once per payload")
        codes = ", ".join(f"{c} {k:,}" for c, k in sorted(self.codes.items(), key=lambda ck: -ck[1]))
        telemetry = ("all counted in telemetry" if self.reported == self.counted
                     else f"telemetry counted {self.counted}, reports {self.reported}")
        return (f"{alive}; {self.valid_identical} valid requests token-identical to run-local, {self.valid_wrong} "
                f"wrong, {self.valid_failed} failed; {self.reports:,} ErrorReports, {once} ({codes}), {telemetry}"
                + ("" if self.rss_bounded else "; RSS grew"))


def hostile_input(ctx: ChaosContext) -> Outcome[HostileCounts]:
    n = 10_000 if ctx.full else 200
    expected = reference_tokens(ctx.artifacts, PROMPTS, NEW_TOKENS)
    manifest = ModelManifest.from_json((ctx.artifacts / "manifest.json").read_bytes())
    names = ["n1", "n2"]
    specs = [NodeSpec(name, args=("--max-envelope-mb", str(NODE_LIMIT_MB))) for name in names]
    misanswered: list[str] = []  # one line per topic and follower that did not answer once per payload
    with running(ctx, "hostile", specs) as (cluster, client, plan):
        watcher = Watcher(client, cluster.cluster)
        fuzzer = MqttClient(url=cluster.url, client_id="fuzzer").start()
        try:
            with Traffic(cluster.url, cluster.cluster, expected, name="warmup", concurrency=1, limit=2) as warm:
                warm.wait(120)
            time.sleep(1.5)  # a telemetry round after the warm-up
            procs = processes(cluster)
            rss_before = {name: rss_mb(pid) for name, pid in procs.items()}
            base = {who: watcher.rejected.get(who, 0) for who in [*names, HEAD]}
            base_reports, base_codes = collections.Counter(watcher.by_reporter), collections.Counter(watcher.codes)
            sent = 0
            fuzzed = targets(cluster.cluster, plan, manifest, names, seed=7)
            with Traffic(cluster.url, cluster.cluster, expected, name="valid") as traffic:
                for target in fuzzed:
                    ctx.log(f"hostile input: {n} payloads on {target.topic}")
                    sent += _inject(fuzzer, watcher, target, n, misanswered)
                traffic.stop()
            dead = tuple(name for name, up in alive(cluster).items() if not up)
            time.sleep(2.5)  # the last telemetry carries the last rejections
            rss_after = {name: rss_mb(pid) for name, pid in procs.items()}
        finally:
            fuzzer.stop()
    reports = collections.Counter(watcher.by_reporter) - base_reports
    codes: collections.Counter[str] = collections.Counter()
    for (_, code), count in (collections.Counter(watcher.codes) - base_codes).items():
        codes[code] += count
    answered = sum(reports.values())
    reports[HEAD] += reports.pop("planner", 0)  # the head's telemetry counts the planner's too
    internal = [r.message for r in watcher.samples if r.code == "internal"]
    problems = list(misanswered)
    problems += [f"internal errors (a handler failed): {internal[:3]}"] if internal else []
    problems += [f"valid requests: {traffic.errors[:3]}"] if traffic.wrong or traffic.failed else []
    counts = HostileCounts(
        topics=len(fuzzed), per_topic=n, sent=sent, dead=dead, valid_identical=traffic.ok, valid_wrong=traffic.wrong,
        valid_failed=traffic.failed, reports=answered, codes=dict(codes), misanswered=len(misanswered),
        reported={who: reports[who] for who in base},
        counted={who: watcher.rejected.get(who, 0) - base[who] for who in base},
        rss_before_mb=rss_before, rss_after_mb=rss_after)
    return Outcome(
        case="hostile input",
        injected=f"{sent:,} malformed payloads ({n:,} on each of {len(fuzzed)} topics: random bytes, truncated "
                 f"frames, gigabyte shapes, bad dtypes, deep/huge JSON, NaN/inf, unknown versions, other messages, "
                 f"bad ids, stale epochs) while valid requests ran",
        counts=counts, problems=tuple(problems),
        figure="RSS MB before -> after: " + ", ".join(f"{k} {rss_before[k]:.0f} -> {rss_after[k]:.0f}"
                                                      for k in rss_before))


def _inject(fuzzer: MqttClient, watcher: Watcher, target: Target, n: int, problems: list[str]) -> int:
    """Publish ``n`` payloads in batches, each batch waited for (one report per payload and
    reporter), so that no queue overflows and a missing report is seen where it happened."""
    before = {who: watcher.count(who, target.topic) for who in target.reporters}
    labels: list[str] = []
    batch = 100
    for item in target.payloads(n):
        fuzzer.publish_raw(target.topic, item.payload, qos=1, retain=False)
        labels.append(item.label)
        if len(labels) % batch == 0:
            _settle(watcher, target, before, len(labels), timeout=60)
    got = _settle(watcher, target, before, len(labels), timeout=60)
    for who, count in got.items():
        if count != len(labels):
            problems.append(f"{who} answered {count} of {len(labels)} payloads on {target.topic}")
    if not target.reporters:
        time.sleep(0.2)
    return len(labels)


def _settle(watcher: Watcher, target: Target, before: dict[str, int], want: int, timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        got = {who: watcher.count(who, target.topic) - before[who] for who in target.reporters}
        if all(v >= want for v in got.values()) or time.monotonic() > deadline:
            if all(v == want for v in got.values()):
                time.sleep(0.05)  # a duplicate would arrive right behind
                got = {who: watcher.count(who, target.topic) - before[who] for who in target.reporters}
            return got
        time.sleep(0.02)


# --- limits ------------------------------------------------------------------------------


CLEAR = {"payload": "exceeds max_payload", "broker": "closed", "max_tokens": "exceeds this hub's cap",
         "kv": "more than the cap", "sessions": "--max-sessions", "rate": "rate limited"}  # limit -> what its error says


@dataclasses.dataclass(frozen=True, kw_only=True)
class LimitCounts:
    refusals: dict[str, str]  # limit (a key of CLEAR) -> the error a user got ("served": none)
    sessions: int  # requests at once on nodes with --max-sessions 1
    sessions_refused: int
    sessions_identical: int  # of those served, token-identical to run-local
    burst: int  # requests in a row from one client
    rate_limited: int  # of those, answered "rate limited"
    other_client_identical: bool  # another client's request meanwhile, served token-identical
    dead: tuple[str, ...]  # processes of the cluster that died

    def unclear(self) -> list[str]:
        return [k for k, want in CLEAR.items() if want not in self.refusals.get(k, "")]

    @property
    def ok(self) -> bool:
        return (not self.unclear() and self.sessions_refused == 1 and self.sessions_identical == self.sessions - 1
                and self.rate_limited > 0 and self.other_client_identical and not self.dead)

    def observed(self) -> str:
        refused = ("each refused with a clear error (too_large, overloaded, rate_limited)" if not self.unclear() else
                   "not refused clearly: " + ", ".join(f"{k} {self.refusals.get(k)!r}" for k in self.unclear()))
        served = self.sessions_identical == self.sessions - self.sessions_refused and self.other_client_identical
        return (refused + (", the others served token-identical" if served else ", the others NOT all served")
                + (f"; dead: {', '.join(self.dead)}" if self.dead else ""))


def limits(ctx: ChaosContext) -> Outcome[LimitCounts]:
    """Each limit refused with a clear error while the requests within limits are served."""
    expected = reference_tokens(ctx.artifacts, PROMPTS[:2], NEW_TOKENS)
    manifest = ModelManifest.from_json((ctx.artifacts / "manifest.json").read_bytes())
    # a cap that holds 40 positions even on a node running every layer; the long prompt needs
    # more than 80 on a node running half of them (there are 2 nodes)
    kv_mb = sum(p.kv_bytes_per_token for p in manifest.pieces) * 40 / 2**20
    long_prompt = _prompt_of_tokens(ctx.artifacts, 120)
    specs = [NodeSpec(name, args=("--max-sessions", "1", "--kv-max-mb", f"{kv_mb:.6f}")) for name in ("n1", "n2")]
    seen: dict[str, str] = {}
    problems: list[str] = []
    with running(ctx, "limits", specs, hub_args=("--max-tokens", "12", "--rate", "0.2", "--burst", "3")) as \
            (cluster, client, plan):
        def gen(prompt: str, max_tokens: int = NEW_TOKENS, client_id: str = "limits") -> GenerateResult:
            return generate_remote(client, cluster.cluster, GenerateRequest(
                id=new_request_id(), prompt=prompt, max_tokens=max_tokens, client=client_id), timeout=60)

        # payload size: refused by the sender's client before it reaches the broker
        try:
            client.publish_raw(topics.REQUESTS.build(cluster.cluster), b"x" * (client.max_payload + 1), qos=1)
            problems.append("an oversized publish was sent")
        except PayloadTooLarge as exc:
            seen["payload"] = str(exc)
        # ... and over the broker's cap from a client that does not check: that connection closed, others fine
        seen["broker"] = _broker_drops_oversized(cluster.url, client.max_payload + 1)
        # max_tokens cap
        r = gen(PROMPTS[0], max_tokens=100, client_id="wants-many")
        seen["max_tokens"] = r.error or "served"
        # KV cap: a prompt whose KV alone exceeds --kv-max-mb
        r = gen(long_prompt, max_tokens=2, client_id="long-prompt")
        seen["kv"] = r.error or "served"
        # sessions per node: two at once, one node session each -> one refused, the other exact
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            pair = list(pool.map(lambda p: gen(p, client_id=f"c{PROMPTS.index(p)}"), PROMPTS[:2]))
        refused = [r for r in pair if r.error]
        served = [(p, r) for p, r in zip(PROMPTS[:2], pair) if not r.error]
        seen["sessions"] = str(refused[0].error) if refused else "both served"
        if len(refused) != 1 or any(r.tokens != expected[p] for p, r in served):
            problems.append(f"max-sessions: {[(r.error, r.tokens) for r in pair]}")
        # per-client rate: a burst beyond --burst is answered rate_limited; another client unaffected
        burst = [gen(PROMPTS[0], max_tokens=1, client_id="greedy") for _ in range(8)]
        limited = [r for r in burst if r.error and "rate limited" in r.error]
        seen["rate"] = str(limited[0].error) if limited else "not limited"
        other = gen(PROMPTS[1], client_id="polite")
        if other.error or other.tokens != expected[PROMPTS[1]]:
            problems.append(f"another client was affected: {other.error}")
        dead = tuple(name for name, up in alive(cluster).items() if not up)
    counts = LimitCounts(refusals=seen, sessions=len(pair), sessions_refused=len(refused),
                         sessions_identical=sum(1 for p, r in served if r.tokens == expected[p]), burst=len(burst),
                         rate_limited=len(limited),
                         other_client_identical=other.error is None and other.tokens == expected[PROMPTS[1]],
                         dead=dead)
    return Outcome(
        case="limits",
        injected=f"a payload over max_payload (our client, then a raw one), max_tokens 100 over --max-tokens 12, a "
                 f"120-token prompt whose KV exceeds --kv-max-mb {kv_mb:.3f} (40 positions), 2 sessions on nodes with --max-sessions 1, 8 requests "
                 "in a row from one client (--rate 0.2 --burst 3)",
        counts=counts, problems=tuple(problems),
        figure=f"rate: {counts.rate_limited}/{counts.burst} limited; sessions: {counts.sessions_refused}/"
               f"{counts.sessions} refused")


def _prompt_of_tokens(art: Path, tokens: int) -> str:
    from linguamq.tools.local import open_local
    tokenizer = open_local(art).tokenizer
    words: list[str] = []
    while len(tokenizer.encode(" ".join(words)).ids) < tokens:
        words.append("tensor")
    return " ".join(words)


def _broker_drops_oversized(url: str, size: int) -> str:
    """Send one PUBLISH of ``size`` bytes with a bare socket; "closed" if the broker hangs up."""
    host, port = url.split("//", 1)[1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        client_id = b"oversized"
        var = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
        sock.sendall(b"\x10" + _remaining(len(var)) + var)
        if sock.recv(4)[:1] != b"\x20":
            return "no CONNACK"
        topic = b"lmq-oversized"
        body = len(topic).to_bytes(2, "big") + topic
        sock.sendall(b"\x30" + _remaining(len(body) + size) + body)
        try:
            chunk = b"\x00" * (1 << 20)
            for _ in range(size // len(chunk) + 1):
                sock.sendall(chunk)
            sock.settimeout(10)
            return "closed" if sock.recv(1) == b"" else "still open"
        except (ConnectionResetError, BrokenPipeError):
            return "closed"
        except TimeoutError:
            return "still open"


def _remaining(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


# --- soak --------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class SoakCounts:
    requests: int
    identical: int  # token-identical to run-local
    wrong: int
    lost: int  # failed, or never done
    growth: dict[str, float]  # process -> RSS growth after warm-up, as a fraction
    dead: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.wrong == 0 and not self.dead and all(g < 0.10 for g in self.growth.values())

    def observed(self) -> str:
        return (f"{self.identical} token-identical to run-local, {self.wrong} wrong, {self.lost} lost; RSS growth "
                "after warm-up: " + ", ".join(f"{k} {g:+.1%}" for k, g in sorted(self.growth.items()))
                + (f"; dead: {list(self.dead)}" if self.dead else ""))


def soak(ctx: ChaosContext) -> Outcome[SoakCounts]:
    total, minutes = (500, 10.0) if ctx.full else (30, 1.0)
    expected = reference_tokens(ctx.artifacts, PROMPTS, NEW_TOKENS)
    specs = [NodeSpec(f"n{i}") for i in (1, 2, 3)]
    concurrency = 4
    pause = max(0.0, minutes * 60 * concurrency / total - 0.3)  # spreads the requests over the duration
    with running(ctx, "soak", specs) as (cluster, client, plan):
        procs = processes(cluster)
        with Traffic(cluster.url, cluster.cluster, expected, name="soak", concurrency=concurrency, pause_s=pause,
                     limit=total) as traffic:
            warm = min(50, total // 10)
            t0 = time.monotonic()
            while traffic.done < warm and time.monotonic() - t0 < 300:
                time.sleep(0.5)
            rss_start = {name: rss_mb(pid) for name, pid in procs.items()}
            ctx.log(f"soak: warmed up after {warm} requests; RSS {({k: round(v) for k, v in rss_start.items()})}")
            while traffic.done < total and time.monotonic() - t0 < minutes * 60 * 2 + 120:
                time.sleep(2)
                ctx.log(f"soak: {traffic.done}/{total} done")
            traffic.wait(120)
        elapsed = time.monotonic() - t0
        rss_end = {name: rss_mb(pid) for name, pid in procs.items()}
        dead = tuple(name for name, up in alive(cluster).items() if not up)
    growth = {k: (rss_end[k] - rss_start[k]) / rss_start[k] for k in rss_start if k != "hub" and rss_start[k]}
    worst = max(growth, key=lambda k: growth[k])
    counts = SoakCounts(requests=total, identical=traffic.ok, wrong=traffic.wrong,
                        lost=total - traffic.done + traffic.failed, growth=growth, dead=dead)
    return Outcome(
        case="soak",
        injected=f"{total} requests ({NEW_TOKENS} tokens each, {concurrency} clients) over {elapsed / 60:.1f} min on "
                 f"3 nodes",
        counts=counts, problems=tuple(traffic.errors[:2]),
        figure=f"worst RSS growth {worst} {growth[worst]:+.1%} ({rss_start[worst]:.0f} -> {rss_end[worst]:.0f} MB)")


CASES = [Case("hostile input", hostile_input), Case("limits", limits), Case("soak", soak, slow=True)]
