"""The node daemon: runs its assigned segments and passes activations on.

Lifecycle: ``start()`` publishes a retained "online" status (the MQTT will marks the
node offline if it vanishes), follows the retained manifest and its own retained
assignment, fetches the pieces it lacks over `blobs/`, loads them, subscribes to
`act/{first}` of each segment and reports "ready". ``stop()`` reports "offline".

All work runs on one worker thread, so paho's network thread never runs a model nor
fetches a piece, and a node never runs two things at once (a phone has few cores).
Activations wait in one bounded queue; a full queue fails the request loudly. The
manifest and the assignment never wait there: each has a slot of its own holding the
newest one, which the worker takes before its next activation (dropped, a retained
assignment is not sent again, and the node would stay on its old epoch).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import hashlib
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import structlog

import linguamq
from linguamq import topics
from linguamq.node import merge, system
from linguamq.node.blobs import BlobCache, BlobError
from linguamq.node.clock import ClockResponder
from linguamq.node.errors import NodeError, RuntimeInputError
from linguamq.node.kvcache import KVCache, KVCacheFull
from linguamq.node.profile import (
    RowMeter,
    make_profile,
    probe_batch,
    probe_compute,
    probe_link,
    probe_rows,
    probe_runtime,
    work_clock,
)
from linguamq.node.runtime import MERGED_DIR, RuntimeSettings, SegmentRuntime
from linguamq.node.sampling import SamplingParams, sample, step_rng
from linguamq.schemas import envelope
from linguamq.schemas.cluster import (
    Assignment,
    BatchTiming,
    NodeControl,
    NodeState,
    NodeStatus,
    PieceTiming,
    Profile,
    Segment,
    Telemetry,
)
from linguamq.schemas.envelope import ActHeader, Hop
from linguamq.schemas.manifest import ModelManifest
from linguamq.schemas.requests import ErrorCode
from linguamq.topics.client import MqttClient, MqttError, Will

log = structlog.get_logger()
MAX_TRACKED_STEPS = 65536  # (session, stage) pairs whose last step is remembered, least recent dropped
LATE_ENDS_MAX = 4096  # end envelopes kept while the work queue is full (ends are tiny; any node may send them)
ENDED = 2**63  # the step an `end` records: above every real step of its chain
ACTIVE_S = 2.0  # a session that ran a step here this recently is in flight (the batch cap)
# A batch's outputs leave one message per session, back to back: an idle next stage would take
# the first alone. It waits this long at most for the steps a header says are right behind it.
SIBLING_WAIT_S = 0.005
MAX_BATCH = 1024  # rows of a batch at most (`--max-batch`); ActHeader.behind allows 4096
_Act = tuple[str, ActHeader, np.ndarray, float]  # a queued envelope: topic, header, tensor, t_recv


@dataclasses.dataclass(frozen=True, kw_only=True)
class NodeSettings:
    name: str
    cluster: str = "home"
    cache_dir: Path = Path("~/.cache/linguamq").expanduser()
    threads: int = 0  # ONNX Runtime intra-op threads; 0: one per core
    slowdown: float = 1.0  # behave like a device this many times slower (sleeps, no CPU)
    mem_budget_mb: float = 0.0  # 0: no budget
    telemetry_interval_s: float = 1.0
    queue_size: int = 256
    spin: bool = True  # ORT threads spin between ops; off when several nodes share a machine
    kv_max_mb: float = 1024.0  # KV cache bound; least recently used sessions are evicted beyond it
    kv_ttl_s: float = 600.0  # sessions idle this long are dropped
    max_sessions: int = 0  # sessions holding KV here at once; a new one beyond is refused `overloaded` (0: no cap)
    max_envelope_mb: float = 64.0  # larger payloads are refused before decoding (the broker's default cap)
    merge_layers: bool = True  # run a segment's layers as one graph where `onnx` is installed (node/merge.py)
    # The ring's bound on a silent head: the tail sends no step ahead once the hub's telemetry
    # (every ~1 s) is older than this, so the chains of a head that died stop within seconds.
    head_silence_s: float = 5.0
    # Decode steps of several sessions run as one call, at most this many (1: one at a time).
    max_batch: int = 8


def status_will(cluster: str, name: str) -> Will:
    """The last will a node's MQTT connection must carry: a retained "offline" status."""
    payload = NodeStatus(node=name, state="offline", ts=0.0, version=linguamq.__version__).to_json()
    return Will(topics.NODE_STATUS.build(cluster, node=name), payload, qos=1, retain=True)


@dataclasses.dataclass
class _Stage:
    segment: Segment
    runtime: SegmentRuntime


@dataclasses.dataclass(frozen=True)
class _Step:
    """An envelope admitted to run: its session's cache ends where it starts."""
    topic: str
    header: ActHeader
    array: np.ndarray
    t_recv: float
    stage: _Stage


def _ewma(old: float | None, ms: float) -> float:
    """A step's time into a running average (None: the first)."""
    return ms if old is None else 0.8 * old + 0.2 * ms


def _is_decode_step(header: ActHeader, array: np.ndarray) -> bool:
    """One position of one session: what a batch is made of."""
    return not header.end and not header.more and array.ndim >= 2 and array.shape[:2] == (1, 1)


class NodeDaemon:
    def __init__(self, *, client: MqttClient, settings: NodeSettings) -> None:
        self._client, self.settings = client, settings
        self.name, self._cluster = settings.name, settings.cluster
        self._blobs = BlobCache(root=settings.cache_dir / "blobs", client=client, cluster=settings.cluster,
                                node=settings.name)
        self._work: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=settings.queue_size)
        self._control: dict[str, Any] = {}  # "manifest", "assign": the newest of each, never dropped
        self._control_lock = threading.Lock()
        # End envelopes that found the work queue full: never dropped (the session's KV would
        # stay until its TTL), run once the work queued before them is done.
        self._late_ends: collections.deque[tuple[str, Any]] = collections.deque()
        self._kv = self._new_cache()
        self._manifest: ModelManifest | None = None
        self._manifest_sha = ""
        self._pending: Assignment | None = None  # arrived before its manifest
        self.epoch = 0
        self._stages: dict[int, _Stage] = {}  # first piece -> stage
        self._plan_stages = 0  # stages of the epoch's plan (0: not told)
        self._new: set[str] = set()  # sessions new to the KV cache, admitted, not run yet (--max-sessions)
        self._active: collections.OrderedDict[str, float] = collections.OrderedDict()  # session -> last step here
        self.profile: Profile | None = None  # measured when the manifest arrives
        self.slowdown = settings.slowdown  # changeable at run time (NodeControl)
        self._state: NodeState = "online"
        self._timings: dict[int, PieceTiming] = {}
        self._batches: dict[tuple[int, int], BatchTiming] = {}  # (segment's first piece, rows)
        self._rejected = 0
        self._busy_ms = 0.0  # time spent running pieces, reported in telemetry (busy %)
        self._seq = 0
        self._work_clock = work_clock(settings.threads)  # times the compute that --slowdown stretches
        # Telemetry.row_ms; with a pool of ONNX Runtime threads that spin after each call the
        # process's CPU time is mostly their spinning: not measured then
        self._rows = RowMeter(time.process_time)  # the worker's own clock once it runs (_work_loop)
        self._measures_rows = settings.threads == 1 or not settings.spin
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._log = log.bind(node=self.name)
        # (chain, step) last run per (session, stage); (chain, ENDED) once the session ended
        self._steps: collections.OrderedDict[tuple[str, int], tuple[int, int]] = collections.OrderedDict()
        # The tail's ring: (chain, step) of the last step it sent ahead per session, sent once
        self._ahead: collections.OrderedDict[str, tuple[int, int]] = collections.OrderedDict()
        self._eos: frozenset[int] = frozenset()  # the manifest's: the tail sends no step after one
        self._asked: dict[tuple[str, int], tuple[int, int]] = {}  # (epoch, step) of the last re-prefill asked for
        self._head_seen: float | None = None  # monotonic time of the hub's last telemetry; None: never heard
        self.duplicates = 0  # envelopes of a step older than one already run: redeliveries, dropped

    # --- lifecycle ------------------------------------------------------------------

    def start(self) -> None:
        self._client.default_reject = self._reject  # ping, probe, blob chunks: counted and reported too
        self._client.max_payload = min(self._client.max_payload, int(self.settings.max_envelope_mb * 2**20))
        self._publish_status("online")
        # A restarted hub's broker has lost every retained status: publish ours again, with
        # our epoch, so the new planner sees us and continues the epoch count above it.
        self._client.on_reconnect(lambda: self._publish_status(self._state))
        self._client.subscribe(topics.MODEL, topics.MODEL.build(self._cluster), self._on_manifest,
                               on_reject=self._reject)
        self._client.subscribe(topics.NODE_ASSIGN, topics.NODE_ASSIGN.build(self._cluster, node=self.name),
                               self._on_assignment, on_reject=self._reject)
        self._client.subscribe(topics.NODE_CONTROL, topics.NODE_CONTROL.build(self._cluster, node=self.name),
                               self._on_control, on_reject=self._reject)
        self._client.subscribe(topics.HUB_TELEMETRY, topics.HUB_TELEMETRY.build(self._cluster), self._on_hub,
                               on_reject=self._reject)
        ClockResponder(client=self._client, cluster=self._cluster, node=self.name).start()  # for `linguamq trace`
        for target, name in ((self._work_loop, "worker"), (self._telemetry_loop, "telemetry")):
            thread = threading.Thread(target=target, name=f"{self.name}-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        try:
            self._publish_status("offline", wait=2.0)
        except MqttError:
            pass

    @property
    def state(self) -> str:
        return self._state

    # --- network thread: decode, then queue ------------------------------------------

    def _on_manifest(self, topic: str, manifest: ModelManifest, retained: bool) -> None:
        self._set_control("manifest", manifest)

    def _on_control(self, topic: str, control: NodeControl, retained: bool) -> None:
        if control.slowdown is not None:
            self._log.info("slowdown changed", slowdown=control.slowdown, was=self.slowdown)
            self.slowdown = control.slowdown

    def _on_assignment(self, topic: str, assignment: Assignment, retained: bool) -> None:
        self._set_control("assign", assignment)

    def _on_hub(self, topic: str, telemetry: Telemetry, retained: bool) -> None:
        """The head is alive: the ring may go on (``_send_ahead``)."""
        self._head_seen = time.monotonic()

    def _head_silent(self) -> bool:
        """The hub's telemetry stopped for longer than ``head_silence_s``. A node that never
        heard it (a broker whose ACL predates the rule) applies no bound."""
        seen = self._head_seen
        return seen is not None and time.monotonic() - seen > self.settings.head_silence_s

    def _set_control(self, kind: str, item: Any) -> None:
        """Latest wins: an older manifest or assignment not yet applied is superseded."""
        with self._control_lock:
            self._control[kind] = item
        if self._work.empty():  # wake an idle worker; a busy one looks before its next item
            with contextlib.suppress(queue.Full):
                self._work.put_nowait(("wake", None))

    def _on_act(self, topic: str, value: tuple[ActHeader, np.ndarray], retained: bool) -> None:
        header, array = value
        item = ("act", (topic, header, array, time.time()))
        if header.end:
            try:
                return self._work.put_nowait(item)
            except queue.Full:
                if len(self._late_ends) < LATE_ENDS_MAX:
                    return self._late_ends.append(item)
        self._enqueue(item, ref=header.session)

    def _enqueue(self, item: tuple[str, Any], *, ref: str | None) -> None:
        try:
            self._work.put_nowait(item)
        except queue.Full:
            self._report("overloaded", f"work queue full ({self.settings.queue_size}); dropped", ref=ref)

    def _reject(self, topic: str, payload: bytes, exc: Exception) -> None:
        self._report("bad_payload", str(exc), topic=topic)

    def _report(self, code: ErrorCode, message: str, *, topic: str = "", ref: str | None = None) -> None:
        self._rejected += 1
        self._log.warning("rejected", code=code, error=message, ref=ref)
        self._client.report_error(self._cluster, reporter=self.name, to=self.name, topic=topic, code=code,
                                  message=message, ref=ref)

    # --- worker thread ----------------------------------------------------------------

    def _work_loop(self) -> None:
        if self.settings.threads == 1 and hasattr(time, "pthread_getcpuclockid"):
            # the compute runs on this thread: its CPU clock, readable by the telemetry thread
            clock_id = time.pthread_getcpuclockid(threading.get_ident())
            self._rows.use_clock(lambda: time.clock_gettime(clock_id))
        while not self._stop.is_set():
            try:
                kind, item = self._work.get(timeout=0.1)
            except queue.Empty:
                kind, item = "idle", None
            for control in self._take_control():  # before the activation: a new epoch stales it anyway
                with self._rows.other_work():  # loading and probing: no session step's cost
                    self._do(*control)
            if kind == "act" and self.settings.max_batch > 1:
                self._run_acts([item, *self._more_acts(item)])
            else:
                self._do(kind, item)
            while self._late_ends and self._work.empty():  # after all that was queued before them
                self._do(*self._late_ends.popleft())

    def _more_acts(self, first: _Act) -> list[_Act]:
        """Envelopes already queued, up to ``max_batch`` of them, taken to batch with ``first``
        (wakes among them are dropped: the loop looks for control after these anyway). While
        the last one taken says steps of its batch are right behind it (``behind``), they are
        waited for, SIBLING_WAIT_S at most: a batch upstream stays a batch here."""
        acts: list[_Act] = []
        last, deadline = first, time.monotonic() + SIBLING_WAIT_S
        while len(acts) < self.settings.max_batch:  # the cap is looked up only when a step says more follow
            more = last[1].behind and _is_decode_step(last[1], last[2]) and len(acts) + 1 < self._batch_cap()
            wait = deadline - time.monotonic() if more else 0.0
            try:
                kind, item = self._work.get(timeout=wait) if wait > 0 else self._work.get_nowait()
            except queue.Empty:
                break
            if kind == "act":
                acts.append(item)
                last = item
        return acts

    def _take_control(self) -> list[tuple[str, Any]]:
        """The newest manifest, then the newest assignment (which may need that manifest)."""
        with self._control_lock:
            return [(kind, self._control.pop(kind)) for kind in ("manifest", "assign") if kind in self._control]

    def _do(self, kind: str, item: Any) -> None:
        try:
            match kind:
                case "manifest": self._apply_manifest(item)
                case "assign": self._apply_assignment(item)
                case "act": self._run_act(*item)
                case "idle": self._kv.expire()
        except Exception as exc:  # one bad item must not stop the node
            self._log.exception("work item failed", kind=kind)
            self._report("internal", f"{type(exc).__name__}: {exc}")

    def _apply_manifest(self, manifest: ModelManifest) -> None:
        self._manifest = manifest
        self._manifest_sha = hashlib.sha256(manifest.to_json()).hexdigest()
        self._eos = frozenset(manifest.eos_token_ids)
        self._measure()
        if self._pending is not None:
            pending, self._pending = self._pending, None
            self._apply_assignment(pending)

    def _apply_assignment(self, assignment: Assignment) -> None:
        if assignment.epoch <= self.epoch:
            return  # a duplicate or an old retained assignment
        if self._manifest is None or assignment.manifest_sha256 != self._manifest_sha:
            self._pending = assignment  # its manifest is on the way
            return
        self._publish_status("loading")
        cache = self._new_cache()  # a new epoch re-prefills every session
        try:
            stages = self._load(assignment, cache)
        except (BlobError, NodeError, OSError) as exc:
            self._publish_status("online")
            return self._report("internal", f"cannot load epoch {assignment.epoch}: {exc}")
        for first in self._stages:
            self._client.unsubscribe(topics.ACT.build(self._cluster, piece=first))
        self._kv = cache  # the one the new runtimes hold: the alignment rule truncates it
        self._steps.clear()
        self._ahead.clear()
        self._timings = {}  # timings of the old segments are no measure of the new ones
        self._rows.reset()
        self._batches = {}
        self._stages, self.epoch, self._plan_stages = stages, assignment.epoch, assignment.stages
        for first in stages:
            self._client.subscribe(topics.ACT, topics.ACT.build(self._cluster, piece=first), self._on_act,
                                   on_reject=self._reject)
        self._publish_status("ready" if stages else "online")
        self._log.info("assignment applied", epoch=self.epoch,
                       segments=[f"{s.segment.first}-{s.segment.last}" for s in stages.values()])
        if assignment.prefetch:
            threading.Thread(target=self._prefetch, args=(assignment.prefetch,), name=f"{self.name}-prefetch",
                             daemon=True).start()

    def _prefetch(self, pieces: tuple[int, ...]) -> None:
        """Download (not load) boundary pieces so that moving a boundary needs no transfer."""
        manifest = self._manifest
        if manifest is None:  # assignments are taken only after the manifest; nothing to fetch without it
            return
        try:
            with self._rows.other_work():
                for index in pieces:
                    self._blobs.ensure(manifest.pieces[index].sha256)
        except (BlobError, OSError, IndexError) as exc:
            self._log.warning("prefetch failed", error=str(exc))

    def _measure(self) -> None:
        """Profile compute on the first layer piece and the link to the broker (once)."""
        if self.profile is not None:
            return
        manifest = self._manifest
        assert manifest is not None
        try:
            model_dir = self._materialize([p for p in manifest.pieces if p.kind == "layer"][:1])
            probe = probe_runtime(manifest, model_dir, self._runtime_settings())
            compute = probe_compute(probe, self.slowdown, clock=self._work_clock)
            batch_cost = probe_batch(probe, clock=self._work_clock) if self.settings.max_batch > 1 else ()
            link = probe_link(self._client, self._cluster, self.name)
        except (BlobError, NodeError, OSError, MqttError) as exc:
            return self._report("internal", f"cannot profile this node: {exc}")
        try:  # a floor the live measurement replaces; the profile stands without it
            row_ms = probe_rows(self._client, self._cluster, self.name, manifest) if batch_cost else 0.0
        except (MqttError, OSError, ValueError) as exc:
            self._log.warning("row cost not probed", error=str(exc))
            row_ms = 0.0
        self.profile = make_profile(compute, link, self._budget_mb(), batch_cost, row_ms)
        self._log.info("profiled", ms_per_gflop=round(compute[0], 2), rtt_ms=round(link[0], 2),
                       mbps=round(link[1]), mem_budget_mb=round(self.profile.mem_budget_mb), batch_cost=batch_cost,
                       row_ms=round(row_ms, 3))
        self._publish_status(self._state)

    def _new_cache(self) -> KVCache:
        return KVCache(max_bytes=int(self.settings.kv_max_mb * 2**20), ttl_s=self.settings.kv_ttl_s)

    def _budget_mb(self) -> float:
        return self.settings.mem_budget_mb or system.sample().free_mem_mb

    def _runtime_settings(self) -> RuntimeSettings:
        return RuntimeSettings(intra_op_threads=self.settings.threads, allow_spinning=self.settings.spin,
                               merge_layers=self.settings.merge_layers, merge_dir=self._merge_dir)

    @property
    def _merge_dir(self) -> Path:
        """This node's merged layers, of every model: nodes sharing a cache directory (one
        machine) each delete only their own earlier ones."""
        return self.settings.cache_dir / MERGED_DIR / self.name

    def _materialize(self, pieces: list) -> Path:
        """The manifest's directory layout in the cache: each piece's file links to its verified blob."""
        model_dir = self.settings.cache_dir / "models" / self._manifest_sha[:16]
        model_dir.mkdir(parents=True, exist_ok=True)
        for piece in pieces:
            blob = self._blobs.ensure(piece.sha256)
            link = model_dir / piece.file
            link.unlink(missing_ok=True)
            os.symlink(os.path.relpath(blob, model_dir), link)
        return model_dir

    def _load(self, assignment: Assignment, cache: KVCache) -> dict[int, _Stage]:
        manifest = self._manifest
        assert manifest is not None
        needed = [p for seg in assignment.segments for p in manifest.pieces[seg.first:seg.last + 1]]
        if self.settings.mem_budget_mb and sum(p.bytes for p in needed) / 2**20 > self.settings.mem_budget_mb:
            raise NodeError(f"pieces need {sum(p.bytes for p in needed) / 2**20:.0f} MB, "
                            f"budget is {self.settings.mem_budget_mb:.0f} MB")
        model_dir = self._materialize(needed)
        # Pieces this node keeps are not loaded again: their sessions hold no per-session state.
        kept = [piece for stage in self._stages.values() for piece in stage.runtime.loaded]
        stages = {seg.first: _Stage(seg, SegmentRuntime(manifest=manifest, artifact_dir=model_dir, first=seg.first,
                                                         last=seg.last, settings=self._runtime_settings(),
                                                         cache=cache, reuse=kept))
                  for seg in assignment.segments}
        # Layers merged for earlier segments are a copy of their weights on disk: only the current ones stay.
        in_use = {s.runtime.merged_file.name for s in stages.values() if s.runtime.merged_file is not None}
        if left := merge.remove_merged_except(self._merge_dir, in_use):
            self._log.warning("earlier merged layers not deleted", files=left)
        return stages

    def _run_act(self, topic: str, header: ActHeader, array: np.ndarray, t_recv: float) -> None:
        step = self._admit(topic, header, array, t_recv)
        if step is not None:
            self._compute([step])

    def _run_acts(self, items: list[_Act]) -> None:
        """Envelopes taken from the queue together, in their order; decode steps of
        different sessions for one stage that batches wait and run as one call (at most
        ``max_batch``). Anything else (a prompt chunk, an end, a second step of a session
        waiting) first runs what waits, so each session's envelopes keep their order."""
        waiting: dict[int, list[_Step]] = {}  # stage (first piece) -> admitted decode steps

        def flush() -> None:
            for steps in waiting.values():
                self._guarded(self._compute, steps)
            waiting.clear()

        for topic, header, array, t_recv in items:
            if not _is_decode_step(header, array) or any(header.session == w.header.session
                                                         for steps in waiting.values() for w in steps):
                flush()
                self._guarded(self._run_act, topic, header, array, t_recv)
                continue
            step = self._guarded(self._admit, topic, header, array, t_recv)
            if step is None:
                continue
            if not step.stage.runtime.batches:
                self._guarded(self._compute, [step])
                continue
            steps = waiting.setdefault(step.stage.segment.first, [])
            steps.append(step)
            if len(steps) >= self._batch_cap():
                self._guarded(self._compute, waiting.pop(step.stage.segment.first))
        flush()

    def _batch_cap(self) -> int:
        """Rows of a batch: ``max_batch``, and no more than the sessions in flight over the
        plan's stages. A batch's sessions leave together and arrive together at every later
        stage: batched whatever waits, all sessions end in one convoy that keeps one stage
        busy at a time. Groups of sessions / stages keep every stage busy, each with a batch
        (bench hetero (b), 4 sessions on 4 stages: 3.6x one stream with one row a call,
        2.4x with batches of whatever waited)."""
        if not self._plan_stages:
            return self.settings.max_batch
        return max(1, min(self.settings.max_batch, -(-self._active_sessions() // self._plan_stages)))

    def _active_sessions(self) -> int:
        """Sessions that ran a step here within ACTIVE_S: in a ring every session passes every
        stage, so any stage's count is the cluster's (those held in the KV cache would leave
        out a stage without layers, and count sessions idle until their TTL)."""
        self._forget_inactive()
        return len(self._active)

    def _forget_inactive(self) -> None:
        cutoff = time.monotonic() - ACTIVE_S
        while self._active and next(iter(self._active.values())) < cutoff:
            self._active.popitem(last=False)

    def _guarded(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, an unexpected exception reported, not raised: one bad envelope must
        not lose the others taken with it."""
        try:
            return fn(*args)
        except Exception as exc:
            self._log.exception("work item failed", kind="act")
            self._report("internal", f"{type(exc).__name__}: {exc}")
            return None

    def _admit(self, topic: str, header: ActHeader, array: np.ndarray, t_recv: float) -> _Step | None:
        """The envelope's step, ready to compute (its session's cache ends where it starts),
        or None: refused and reported, dropped as a duplicate, or an end (done here)."""
        if header.epoch != self.epoch:  # first: an envelope sent before a replan may be for a piece moved away
            self._report("stale_epoch", f"envelope of epoch {header.epoch}, node is at {self.epoch}",
                         topic=topic, ref=header.session)
            return None
        stage = self._stages.get(header.piece)
        if stage is None:
            self._report("bad_request", f"this node does not run piece {header.piece}", topic=topic,
                         ref=header.session)
            return None
        if self._is_duplicate(stage, header):
            return None
        if header.end:
            self._ahead.pop(header.session, None)
            stage.runtime.drop(header.session)
            self._forward_end(stage, header)
            return None
        if array.dtype.kind == "f" and not np.isfinite(array).all():  # would poison the session's KV
            self._report("bad_payload", "activation holds NaN or infinity", topic=topic, ref=header.session)
            return None
        if self._over_session_cap(stage, header):
            self._report("overloaded", f"node holds {self.settings.max_sessions} sessions (--max-sessions); "
                         f"session {header.session} refused", topic=topic, ref=header.session)
            return None
        if not self._align_cache(stage, header, topic):
            self._new.discard(header.session)
            return None
        self._active[header.session] = time.monotonic()
        self._active.move_to_end(header.session)
        self._forget_inactive()  # bounded whether or not anything batches
        return _Step(topic=topic, header=header, array=array, t_recv=t_recv, stage=stage)

    def _compute(self, steps: list[_Step]) -> None:
        """Run admitted steps of one stage: one alone, several (decode steps of distinct
        sessions) as one batch; then pass each output on. A batch that fails before it ran
        (a row past max_context, no room for its KV) runs its steps one by one, so that only
        the step at fault is refused."""
        stage = steps[0].stage
        self._new.difference_update(s.header.session for s in steps)  # in the cache from here on, or refused
        t_start, work_start = time.time(), self._work_clock()
        self._rows.compute_started()
        if len(steps) > 1:
            try:
                if len({(s.array.shape, s.array.dtype) for s in steps}) > 1:
                    raise RuntimeInputError("envelopes of different shapes or types")
                out = stage.runtime.run_batch(tuple(s.header.session for s in steps),
                                              np.concatenate([s.array for s in steps]),
                                              np.array([s.header.start_pos for s in steps]))
            except NodeError as exc:
                # Each alone, admitted again: a cache the batch dropped (ONNX Runtime failed)
                # or evicted (no room for all) asks for a re-prefill; the step at fault is refused.
                self._log.info("batch run one by one", rows=len(steps), error=str(exc))
                self._rows.computed(0)
                for step in steps:
                    if self._align_cache(step.stage, step.header, step.topic):
                        self._compute([step])
                return
            outs = [out[i:i + 1] for i in range(len(steps))]
        else:
            step = steps[0]
            header = step.header
            try:
                count = step.array.shape[1] if step.array.ndim >= 2 else 0
                positions = np.arange(header.start_pos, header.start_pos + count, dtype=np.int64)[None]
                outs = [stage.runtime.run(header.session, step.array, positions)]
            except KVCacheFull as exc:
                self._rows.computed(0)
                return self._report("too_large", str(exc), topic=step.topic, ref=header.session)
            except NodeError as exc:
                self._rows.computed(0)
                return self._report("bad_request", str(exc), topic=step.topic, ref=header.session)
        compute_s = self._work_clock() - work_start
        self._rows.computed(len(steps))
        self._emulate_slowdown(compute_s)
        # Timed as the profile was (``work_clock``): with one thread the CPU time of the
        # step, which the neighbours on a shared machine do not stretch (timed by the wall
        # clock, a step's time swung 3x under load, and the planner replanned every few s).
        self._record(stage, compute_s * max(self.slowdown, 1.0) * 1e3, rows=len(steps),
                     decode=len(steps) > 1 or _is_decode_step(steps[0].header, steps[0].array))
        # ``behind``: the rows after this one that go on to a next stage. At the tail, only the
        # steps the ring sends ahead; the token-dependent ends (EOS, a silent head) are not known
        # before sampling, and a receiver then waits SIBLING_WAIT_S for a step that never comes.
        goes = [stage.segment.next_piece is not None or (0 < s.header.step + 1 < s.header.ring and not s.header.more)
                for s in steps]
        for i, (step, out) in enumerate(zip(steps, outs)):  # one row failing to go out loses no other row
            count = step.array.shape[1] if step.array.ndim >= 2 else 0
            send = functools.partial(self._send, t_recv=step.t_recv, t_start=t_start, behind=sum(goes[i + 1:]))
            self._guarded(send, stage, step.header, out, count)

    def _over_session_cap(self, stage: _Stage, header: ActHeader) -> bool:
        """A session new to this node's KV cache while it already holds ``max_sessions``,
        counting the new sessions admitted to a batch that has not run yet."""
        cap = self.settings.max_sessions
        if not cap or not stage.runtime.holds_kv or header.session in self._kv or header.session in self._new:
            return False
        if len(self._kv.sessions()) + len(self._new) >= cap:
            return True
        self._new.add(header.session)
        return False

    def _is_duplicate(self, stage: _Stage, header: ActHeader) -> bool:
        """Idempotent steps, one chain: envelopes are ordered by (chain, step), and one older
        than the last this stage ran for the session is dropped. Of the same chain it is a
        redelivery (QoS 1, a backlog after a freeze): run, it would cut the session's cache
        back to its position. Of an older chain it belongs to steps the head has replaced by
        a (re-)prefill (a retry): dropped, so a tail never keeps a second chain going. The
        current step again (a redelivery) passes: the alignment rule recomputes it, with the
        same result. An `end` records (chain, ENDED): the step a tail sent ahead before the
        head ended the session is dropped here, quietly; only a newer chain (the same
        request id asked again) runs."""
        key = (header.session, stage.segment.first)
        last = self._steps.get(key)
        here = (header.chain, ENDED if header.end else header.step)
        if last is not None and (header.chain < last[0] if header.end else here < last):
            self.duplicates += 1
            self._log.debug("old step dropped", session=header.session, step=header.step, last=last)
            return True
        self._steps[key] = here
        self._steps.move_to_end(key)
        while len(self._steps) > MAX_TRACKED_STEPS:
            self._steps.popitem(last=False)
        return False

    def _align_cache(self, stage: _Stage, header: ActHeader, topic: str) -> bool:
        """Make the session's cache end where this envelope starts; False if it cannot.

        One report per (epoch, step): once this stage asked for a re-prefill, the step's
        later prompt chunks, which cannot fit either, are dropped quietly (each used to ask
        for a re-prefill of its own, and the request failed after three)."""
        held = stage.runtime.context_length(header.session)
        if header.start_pos == held or not stage.runtime.holds_kv:
            return True
        key = (header.session, stage.segment.first)
        if header.start_pos < held:  # a re-prefill or a redelivered step: recompute from there
            self._kv.truncate(header.session, header.start_pos)
            return True
        if self._asked.get(key) == (header.epoch, header.step):
            return False
        self._asked[key] = (header.epoch, header.step)
        while len(self._asked) > MAX_TRACKED_STEPS:
            self._asked.pop(next(iter(self._asked)))
        self._report("unknown_session", f"session {header.session} holds {held} positions here, envelope "
                     f"starts at {header.start_pos}: re-prefill needed", topic=topic, ref=header.session)
        return False

    def _send(self, stage: _Stage, header: ActHeader, out: np.ndarray, steps: int, *, t_recv: float,
              t_start: float, behind: int = 0) -> None:
        """Pass the output on: to the next stage, or (the tail) the sampled token to the head.
        The tail's sampling is part of its stage's compute, and `send` is stamped once the
        output is ready, just before it is encoded and published (stamped before sampling,
        the sampling was shown as transfer time). ``behind``: rows of its batch sent after it."""
        nxt = stage.segment.next_piece
        if nxt is None and header.more:
            return  # a prompt chunk with more to come: its cache is written, no token is due yet
        if nxt is None:
            out = self._sample(header, out)  # (1, 1) token
        t_end = time.time()
        if nxt is None:  # the ring: the next step leaves before the token goes to the head
            try:
                self._send_ahead(header, int(out[0, 0]), start_pos=header.start_pos + steps, behind=behind)
            except MqttError as exc:  # the token still goes out: the head's retry resumes the session
                self._log.warning("next step not sent", session=header.session, step=header.step + 1, error=str(exc))
        hop = Hop(node=self.name, first=stage.segment.first, last=stage.segment.last, t_recv=t_recv,
                  t_start=t_start, t_end=t_end, t_send=time.time())
        hops = (*header.hops, hop)[-envelope.MAX_HOPS:]
        if nxt is not None:
            head = ActHeader.for_tensor(out, session=header.session, request=header.request, step=header.step,
                                        epoch=header.epoch, piece=nxt, start_pos=header.start_pos,
                                        sampling=header.sampling, hops=hops, more=header.more, chain=header.chain,
                                        ring=header.ring, behind=behind)
            name = topics.ACT.build(self._cluster, piece=nxt)
            return self._client.publish(topics.ACT, name, envelope.encode(head, out))
        assert self._manifest is not None  # a node runs pieces only once it holds the manifest
        head = ActHeader.for_tensor(out, session=header.session, request=header.request, step=header.step,
                                    epoch=header.epoch, piece=len(self._manifest.pieces),
                                    start_pos=header.start_pos + steps, hops=hops, chain=header.chain)
        name = topics.SESSION_OUT.build(self._cluster, session=header.session)
        self._client.publish(topics.SESSION_OUT, name, envelope.encode(head, out))

    def _send_ahead(self, header: ActHeader, token: int, *, start_pos: int, behind: int = 0) -> None:
        """The ring: the tail sends the session's next step straight to the first stage, and
        the head, which only watches the tokens, is off the critical path. Not after EOS,
        nor past the request's steps (``header.ring``: its max_tokens; 0: the head sends each
        step), and once per (chain, step): a redelivered or recomputed step samples the same
        token again, and sending its successor twice would double every later step. Nor
        while the head is silent: only the head ends a chain (EOS and the limit aside), and
        one that died would leave every session running to its limit, its KV held."""
        nxt = header.step + 1
        if not header.ring or nxt >= header.ring or token in self._eos:
            return
        if self._head_silent():  # nothing bounds a chain but the head: stop it; a live head retries
            return self._log.info("next step not sent: the head is silent", session=header.session, step=nxt)
        mark = (header.chain, nxt)
        if self._ahead.get(header.session, (-1, -1)) >= mark:
            return
        self._ahead[header.session] = mark
        self._ahead.move_to_end(header.session)
        while len(self._ahead) > MAX_TRACKED_STEPS:
            self._ahead.popitem(last=False)
        ids = np.array([[token]], dtype=np.int64)
        step = ActHeader.for_tensor(ids, session=header.session, request=header.request, step=nxt, epoch=header.epoch,
                                    piece=0, start_pos=start_pos, sampling=header.sampling, chain=header.chain,
                                    ring=header.ring, behind=behind)
        self._client.publish(topics.ACT, topics.ACT.build(self._cluster, piece=0), envelope.encode(step, ids))

    def _sample(self, header: ActHeader, logits: np.ndarray) -> np.ndarray:
        sampling = header.sampling
        params = SamplingParams(temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
                                seed=sampling.seed) if sampling else SamplingParams()
        return np.array([[sample(logits, params, step_rng(params.seed, header.step))]], dtype=np.int64)  # (1, 1)

    def _forward_end(self, stage: _Stage, header: ActHeader) -> None:
        nxt = stage.segment.next_piece
        if nxt is not None:
            end = dataclasses.replace(header, piece=nxt)
            self._client.publish(topics.ACT, topics.ACT.build(self._cluster, piece=nxt),
                                 envelope.encode(end, np.zeros(header.shape, dtype=envelope.WIRE_DTYPES[header.dtype])))

    def _emulate_slowdown(self, compute_s: float) -> None:
        if self.slowdown > 1.0:
            time.sleep(compute_s * (self.slowdown - 1.0))

    def _record(self, stage: _Stage, ms: float, rows: int = 1, decode: bool = True) -> None:
        # One EWMA per segment, reported under its first piece, of one decode step's time (the
        # unit the planner's cost model predicts); batches by size beside it. A prompt's chunk
        # of more than one position counts as busy time only: in the EWMA, the prompts of
        # streams starting together read as a node 1.5-1.9x slower, then the decode steps as
        # one 0.6x faster, and the planner replanned (every session re-prefilled) every few
        # seconds (`bench hetero` (b)).
        self._busy_ms += ms
        if not decode:
            return
        if rows > 1:
            key = (stage.segment.first, rows)
            was = self._batches.get(key)
            self._batches[key] = BatchTiming(piece=key[0], rows=rows, runs=(was.runs if was else 0) + 1,
                                             ms_ewma=_ewma(was.ms_ewma if was else None, ms))
            if self.profile is None or not self.profile.batch_cost:
                return
            ms /= self.profile.batch_factor(rows)  # as one step, by the profile's batch cost: under load
            # most steps run in batches, and an EWMA of the few alone lags and swings
        old = self._timings.get(stage.segment.first)  # runs: the times in the EWMA (a batch is one)
        self._timings[stage.segment.first] = PieceTiming(piece=stage.segment.first, ms_ewma=_ewma(old.ms_ewma if old else None, ms),
                                                         runs=(old.runs if old else 0) + 1)

    # --- status and telemetry -----------------------------------------------------------

    def _publish_status(self, state: NodeState, wait: float | None = None) -> None:
        self._state = state
        status = NodeStatus(node=self.name, state=state, ts=time.time(), version=linguamq.__version__,
                            platform=system.platform_name(), threads=self.settings.threads,
                            mem_budget_mb=self.settings.mem_budget_mb, epoch=self.epoch, profile=self.profile)
        self._client.publish(topics.NODE_STATUS, topics.NODE_STATUS.build(self._cluster, node=self.name), status,
                             wait=wait)

    def _telemetry_loop(self) -> None:
        while not self._stop.wait(self.settings.telemetry_interval_s):
            self._seq += 1
            sample_ = system.sample()
            report = Telemetry(node=self.name, ts=time.time(), seq=self._seq, epoch=self.epoch,
                               pieces=tuple(self._timings.values()), batches=tuple(self._batches.values()),
                               queue_depth=self._work.qsize(),
                               sessions=len(self._kv.sessions()), kv_bytes=self._kv.nbytes(),
                               free_mem_mb=sample_.free_mem_mb, rss_mb=sample_.rss_mb,
                               battery_pct=sample_.battery_pct, thermal_c=sample_.thermal_c,
                               rejected=self._rejected, slowdown=self.slowdown, profile=self.profile,
                               busy_ms=self._busy_ms, row_ms=self._rows.sample() if self._measures_rows else None)
            try:
                self._client.publish(topics.NODE_TELEMETRY,
                                     topics.NODE_TELEMETRY.build(self._cluster, node=self.name), report)
            except MqttError as exc:
                self._log.debug("telemetry not sent", error=str(exc))
