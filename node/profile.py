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

import statistics
import threading
import time
from collections.abc import Callable

import numpy as np

from linguamq import topics
from linguamq.node.kvcache import KVCache
from linguamq.node.runtime import SegmentRuntime
from linguamq.schemas.cluster import Profile
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


def make_profile(compute: tuple[float, float], link: tuple[float, float], mem_budget_mb: float,
                 batch_cost: tuple[float, ...] = ()) -> Profile:
    decode, prefill = compute
    rtt_ms, mbps = link
    return Profile(ms_per_gflop_decode=max(decode, 1e-6), ms_per_gflop_prefill=max(prefill, 1e-6),
                   mem_budget_mb=mem_budget_mb, rtt_ms=rtt_ms, uplink_mbps=max(mbps, 1e-3),
                   downlink_mbps=max(mbps, 1e-3), batch_cost=batch_cost)
