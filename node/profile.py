"""A node measures itself: compute speed on a real piece, and its link to the broker.

LinguaLinked profiles each phone on a probe module before planning. Here the probe is
the model's first layer piece (fetched like any other piece): its decode (1 token) and
prefill (32 tokens) times, divided by the piece's FLOPs from the manifest, give ms per
GFLOP. The link is measured by sending a small and a large message to the node's own
probe topic through the broker: the small one's round trip, after a pause as a stage
waits for its turn, is the RTT; the difference of back-to-back small and large ones gives
the throughput (the message crosses the uplink and the downlink).
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np

from linguamq import topics
from linguamq.node.kvcache import KVCache
from linguamq.node.runtime import SegmentRuntime
from linguamq.schemas import envelope
from linguamq.schemas.cluster import Profile
from linguamq.schemas.envelope import ActHeader
from linguamq.schemas.manifest import ModelManifest
from linguamq.topics.client import MqttClient, MqttTimeout

PREFILL_TOKENS = 32
LINK_BYTES = 256 * 1024
MAX_MBPS = 10_000.0  # loopback is "infinitely" fast; keep numbers finite and sane
IDLE_BEFORE_HOP_S = 0.02  # the pause before each RTT probe: about a stage's wait for its next turn


def work_clock(threads: int) -> Callable[[], float]:
    """The clock that times a node's compute, for its profile and for ``--slowdown``.

    With one ONNX Runtime thread the model runs on the calling thread, so that thread's
    CPU time is how long the compute takes on a device of its own. Wall time on a shared
    machine adds the neighbours' turns: four nodes probing at once would profile each
    other, and an emulated slow device would sleep (X-1) times the contention too. With
    more threads the work is spread over a pool: wall time."""
    return time.thread_time if threads == 1 else time.perf_counter


def probe_compute(runtime: SegmentRuntime, slowdown: float, repeats: int = 5,
                  clock: Callable[[], float] = time.perf_counter) -> tuple[float, float]:
    """(ms per GFLOP decoding, ms per GFLOP in prefill) on ``runtime``'s single layer piece,
    timed by ``clock`` (``work_clock``)."""
    piece = runtime.pieces[0]
    hidden = runtime.manifest.hidden_size
    dtype = np.float16 if runtime.manifest.act_dtype == "float16" else np.float32

    def once(tokens: int) -> float:
        x = np.zeros((1, tokens, hidden), dtype=dtype)  # (1, T, H)
        started = clock()
        runtime.run("probe", x, np.arange(tokens, dtype=np.int64)[None])
        elapsed = clock() - started
        runtime.drop("probe")
        return elapsed * 1e3 * slowdown

    once(1)  # warm-up: first runs allocate
    decode = statistics.median(once(1) for _ in range(repeats))
    prefill = statistics.median(once(PREFILL_TOKENS) for _ in range(repeats))
    decode_gflop = max(piece.flops_per_token, 1) / 1e9
    prefill_gflop = max(piece.flops_per_prompt_token, 1) * PREFILL_TOKENS / 1e9
    return decode / decode_gflop, prefill / prefill_gflop


class RowMeter:
    """CPU time per session step outside the compute: the message received and decoded, the
    tail's sampling, the output encoded and published (Profile.row_ms; a batch saves the
    compute, not these). The process's CPU time over a window less the compute's, over the
    session steps run in it. ``cpu_clock`` times the compute and must be readable from any
    thread (``use_clock``: the worker's own CPU clock with one ONNX Runtime thread), so that a
    call under way when a window closes is split between the windows; with one thread the paho
    thread receiving meanwhile counts as row cost. A window closes once it holds ``min_rows``
    steps (an older one, ``max_window_s``, is dropped), and is sampled only when its calls ran
    ``min_rows_per_call`` steps on average: one step a call, the figure is mostly the per-call
    cost, which a batch's extra sessions do not pay (one stream in `bench hetero` (b): 2.6-4.9
    ms against 1.25-2.2 in batches), and it would overcharge every batched plan. Windows with
    other work in them (loading, probing, fetching pieces: ``other_work``) are not sampled.
    Estimates are averaged (0.8 old, 0.2 new); ``reset`` forgets them (a new segment: a tail
    samples and sends two messages a step, other stages one)."""

    def __init__(self, cpu_clock: Callable[[], float], *, min_rows: int = 20, min_rows_per_call: float = 1.5,
                 max_window_s: float = 10.0, process_clock: Callable[[], float] = time.process_time,
                 wall_clock: Callable[[], float] = time.monotonic) -> None:
        self._cpu_clock, self._process_clock, self._wall_clock = cpu_clock, process_clock, wall_clock
        self._min_rows, self._min_rows_per_call, self._max_window_s = min_rows, min_rows_per_call, max_window_s
        self._lock = threading.Lock()
        self._compute_s = 0.0  # CPU seconds of compute calls ended, all time
        self._started: float | None = None  # cpu_clock at the start of the call under way
        self._rows = self._calls = 0  # session steps and calls ended, all time
        self._window = self._now()
        self._others = 0  # other work under way
        self._tainted = False  # other work ran in this window
        self.row_ms: float | None = None

    def use_clock(self, cpu_clock: Callable[[], float]) -> None:
        """Between calls only (the worker, before its first)."""
        with self._lock:
            self._cpu_clock = cpu_clock

    def _now(self) -> tuple[float, float, int, int, float]:
        """(process CPU, compute CPU so far with the call under way, rows, calls, wall time)."""
        compute = self._compute_s + (self._cpu_clock() - self._started if self._started is not None else 0.0)
        return self._process_clock(), compute, self._rows, self._calls, self._wall_clock()

    def compute_started(self) -> None:
        with self._lock:
            if self._started is not None:  # a call that raised before computed(): compute all the same
                self._compute_s += self._cpu_clock() - self._started
            self._started = self._cpu_clock()

    def computed(self, rows: int) -> None:
        """The call since ``compute_started()`` ran ``rows`` session steps (0: it failed)."""
        with self._lock:
            if self._started is not None:
                self._compute_s += self._cpu_clock() - self._started
            self._started = None
            if rows:
                self._rows += rows
                self._calls += 1

    def reset(self) -> None:
        with self._lock:
            self.row_ms, self._window = None, self._now()

    @contextlib.contextmanager
    def other_work(self) -> Iterator[None]:
        """CPU spent in the block is no step's: the windows it overlaps are not sampled."""
        with self._lock:
            self._others += 1
            self._tainted = True
        try:
            yield
        finally:
            with self._lock:
                self._others -= 1

    def sample(self) -> float | None:
        """Called about once a second (the telemetry thread); the estimate so far."""
        with self._lock:
            now = self._now()
            cpu, compute, rows, calls, wall = (b - a for a, b in zip(self._window, now))
            if rows == 0 and self._started is None:  # idle: a window starts with the steps
                self._window, self._tainted = now, self._others > 0
                return self.row_ms
            if rows < self._min_rows and wall < self._max_window_s and not self._tainted:
                return self.row_ms  # the window stays open: a slow node gets there too
            self._window, tainted = now, self._tainted
            self._tainted = self._others > 0
            if not tainted and rows >= self._min_rows and rows >= self._min_rows_per_call * calls:
                ms = max(cpu - compute, 0.0) / rows * 1e3
                self.row_ms = ms if self.row_ms is None else 0.8 * self.row_ms + 0.2 * ms
            return self.row_ms


BATCH_ROWS = (2, 4, 8)  # the batch sizes a profile's batch_cost measures


def probe_batch(runtime: SegmentRuntime, rows: tuple[int, ...] = BATCH_ROWS, repeats: int = 7,
                clock: Callable[[], float] = time.perf_counter) -> tuple[float, ...]:
    """A decode step of each of ``rows`` sessions run as one batch on ``runtime``'s layer
    piece, over one session's step (medians over ``repeats`` rounds of each size's ratio to
    that round's single step, at PREFILL_TOKENS cached positions); () when
    the runtime cannot batch. One layer alone: a merged segment's and the head's ratios
    differ somewhat (SmolLM2 int4, 4 rows: layers 1.7x, head 1.4x)."""
    if not runtime.batches:
        return ()
    hidden = runtime.manifest.hidden_size
    dtype = np.float16 if runtime.manifest.act_dtype == "float16" else np.float32
    sessions = tuple(f"probe-{i}" for i in range(max(rows)))
    for session in sessions:
        runtime.run(session, np.zeros((1, PREFILL_TOKENS, hidden), dtype), np.arange(PREFILL_TOKENS)[None])

    def once(n: int) -> float:
        x = np.zeros((n, 1, hidden), dtype=dtype)
        for session in sessions[:n]:
            runtime.cache.truncate(session, PREFILL_TOKENS)  # every step at the same position
        started = clock()
        if n == 1:
            runtime.run(sessions[0], x, np.array([[PREFILL_TOKENS]]))
        else:
            runtime.run_batch(sessions[:n], x, np.full(n, PREFILL_TOKENS))
        return clock() - started

    try:
        once(max(rows))  # warm-up
        # Every size once a round, ratios to that round's single step, medians over rounds: timed
        # size by size, a spell of contention (nodes starting together on one machine) fell on
        # one size; two nodes of one model on one VM probed 4 rows at 1.43x and 2.04x one step.
        rounds = [[once(n) for n in (1, *rows)] for _ in range(repeats)]
        return tuple(round(max(statistics.median(r[k] / r[0] for r in rounds), 1.0), 3)
                     for k in range(1, len(rows) + 1))
    finally:
        for session in sessions:
            runtime.drop(session)


def probe_runtime(manifest, artifact_dir, settings) -> SegmentRuntime:
    """A throwaway runtime of the model's first layer piece, with its own cache."""
    first_layer = next(p.index for p in manifest.pieces if p.kind == "layer")
    return SegmentRuntime(manifest=manifest, artifact_dir=artifact_dir, first=first_layer, last=first_layer,
                          settings=settings, cache=KVCache())


def probe_link(client: MqttClient, cluster: str, node: str, *, timeout: float = 5.0) -> tuple[float, float]:
    """(rtt ms, Mbps each way) through the broker, by messages the node sends itself."""
    name = topics.NODE_PROBE.build(cluster, node=node)
    arrived = threading.Event()
    client.subscribe(topics.NODE_PROBE, name, lambda _t, _p, _r: arrived.set(), wait=timeout)
    try:
        loop = _loop_timer(client, name, arrived, timeout)
        loop(16)  # warm-up (the subscription settles)
        small = min(loop(16) for _ in range(3))
        large = min(loop(LINK_BYTES) for _ in range(3))
        rtt = statistics.median(_after_idle(loop) for _ in range(5))
    finally:
        client.unsubscribe(name)
    seconds = max(large - small, 1e-6)
    mbps = min(2 * LINK_BYTES * 8 / seconds / 1e6, MAX_MBPS)
    return rtt * 1e3, mbps


def _after_idle(loop: Callable[[int], float]) -> float:
    """A small message's round trip after a pause: a stage waits for its turn, so a hop
    wakes idle processes, which costs more than messages back to back (0.3 vs ~1 ms per
    hop on the shared 2-vCPU VM: `linguamq bench transport --idle`). The bandwidth, a
    difference of two back-to-back sizes, is not affected."""
    time.sleep(IDLE_BEFORE_HOP_S)
    return loop(16)


def _loop_timer(client: MqttClient, name: str, arrived: threading.Event,
                timeout: float) -> Callable[[int], float]:
    def loop(size: int) -> float:
        arrived.clear()
        started = time.perf_counter()
        client.publish_raw(name, bytes(size), qos=0)
        if not arrived.wait(timeout):
            raise MqttTimeout(f"link probe of {size} bytes did not come back within {timeout:.0f} s")
        return time.perf_counter() - started
    return loop


ROW_PROBES = 50  # activation envelopes probe_rows sends itself


def probe_rows(client: MqttClient, cluster: str, node: str, manifest: ModelManifest, *,
               count: int = ROW_PROBES, timeout: float = 5.0) -> float:
    """CPU ms per session step's messages (Profile.row_ms) before any step ran: ``count``
    envelopes of one position's activation, encoded, published to the node's own probe topic
    (at the activations' QoS), received and decoded, back to back; the process's CPU time
    over them, per envelope (a stage receives one and sends one a step). A floor: the real
    steps (RowMeter, which replaces it once they run) also pay the hand-over to the worker,
    admission, the batch's assembly, the tail's sampling and second message."""
    name = topics.NODE_PROBE.build(cluster, node=node)
    dtype = np.float16 if manifest.act_dtype == "float16" else np.float32
    x = np.zeros((1, 1, manifest.hidden_size), dtype=dtype)
    lock, done, got = threading.Lock(), threading.Event(), [0]

    def arrived(_topic: str, data: bytes, _retained: bool) -> None:
        envelope.decode(data)
        with lock:
            got[0] += 1
            if got[0] >= count:
                done.set()

    client.subscribe(topics.NODE_PROBE, name, arrived, qos=topics.ACT.qos, wait=timeout)
    try:
        def burst() -> float:
            with lock:
                got[0] = 0
            done.clear()
            started = time.process_time()
            for step in range(count):
                header = ActHeader.for_tensor(x, session="probe", request="probe", step=step, epoch=0, piece=0,
                                              start_pos=step)
                client.publish_raw(name, envelope.encode(header, x), qos=topics.ACT.qos)
            if not done.wait(timeout):
                raise MqttTimeout(f"row probe: {count} envelopes did not come back within {timeout:.0f} s")
            return (time.process_time() - started) / count * 1e3

        burst()  # warm-up
        return statistics.median(burst() for _ in range(3))
    finally:
        client.unsubscribe(name)


def make_profile(compute: tuple[float, float], link: tuple[float, float], mem_budget_mb: float,
                 batch_cost: tuple[float, ...] = (), row_ms: float = 0.0) -> Profile:
    decode, prefill = compute
    rtt_ms, mbps = link
    return Profile(ms_per_gflop_decode=max(decode, 1e-6), ms_per_gflop_prefill=max(prefill, 1e-6),
                   mem_budget_mb=mem_budget_mb, rtt_ms=rtt_ms, uplink_mbps=max(mbps, 1e-3),
                   downlink_mbps=max(mbps, 1e-3), batch_cost=batch_cost, row_ms=row_ms)
