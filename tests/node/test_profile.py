"""A node's compute profile and the clock that times its compute (and --slowdown)."""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
import types
from pathlib import Path

import numpy as np
import pytest

from linguamq.node.profile import probe_batch, probe_compute, probe_runtime, work_clock
from linguamq.node.runtime import RuntimeSettings
from linguamq.schemas.manifest import ModelManifest

Art = tuple[Path, ModelManifest]


def test_one_thread_clock_counts_only_the_time_this_thread_runs() -> None:
    """With one ORT thread the compute runs on the caller: time it waits for the cores
    (here: sleeps) is not compute, so an emulated slow device does not stretch it."""
    clock = work_clock(1)
    started = clock()
    time.sleep(0.2)
    assert clock() - started < 0.05
    assert work_clock(2) is time.perf_counter and work_clock(0) is time.perf_counter


def test_one_thread_clock_is_per_thread() -> None:
    """A neighbour burning CPU in another thread is not counted to this one."""
    clock, stop = work_clock(1), threading.Event()
    burner = threading.Thread(target=lambda: [None for _ in iter(stop.is_set, True)], daemon=True)
    started = clock()
    burner.start()
    time.sleep(0.2)
    stop.set()
    burner.join()
    assert clock() - started < 0.05


@pytest.mark.parametrize("slowdown", [1.0, 3.0])
def test_probe_reports_the_emulated_speed(artifacts: Art, slowdown: float) -> None:
    """Every probe run timed at 2 ms by the clock: the profile says 2 ms x slowdown per
    run, over the piece's FLOPs."""
    path, manifest = artifacts
    ticks = itertools.count(step=0.002)
    runtime = probe_runtime(manifest, path, RuntimeSettings(intra_op_threads=1))
    decode, prefill = probe_compute(runtime, slowdown, clock=lambda: next(ticks))
    piece = runtime.pieces[0]
    assert decode == pytest.approx(2.0 * slowdown / (piece.flops_per_token / 1e9))
    assert prefill == pytest.approx(2.0 * slowdown / (piece.flops_per_prompt_token * 32 / 1e9))


@pytest.mark.integration
def test_link_probe_measures_hops_that_start_from_idle() -> None:
    """The RTT is of messages sent after a pause (as a stage waits for its turn), the
    throughput of back-to-back ones; both sane on loopback."""
    from linguamq.broker import BrokerThread
    from linguamq.node.profile import IDLE_BEFORE_HOP_S, MAX_MBPS, probe_link
    from linguamq.topics.client import MqttClient

    with BrokerThread() as broker, MqttClient(url=broker.url, client_id="n1") as client:
        started = time.perf_counter()
        rtt_ms, mbps = probe_link(client, "home", "n1")
        elapsed = time.perf_counter() - started
    assert elapsed >= 5 * IDLE_BEFORE_HOP_S
    assert 0 < rtt_ms < 1000 and 0 < mbps <= MAX_MBPS


def test_the_probe_measures_what_a_batch_costs_over_one_step(artifacts: Art) -> None:
    path, manifest = artifacts
    runtime = probe_runtime(manifest, path, RuntimeSettings(intra_op_threads=1))
    cost = probe_batch(runtime, repeats=3, clock=work_clock(1))  # CPU time: the suite's load does not stretch it
    assert len(cost) == 3 and all(c >= 1.0 for c in cost)
    assert cost[-1] < 6.0  # 8 rows as one call: far less than 8 calls (~1.2-2x on this model)
    assert runtime.cache.sessions() == ()  # its sessions are gone
    unbatched = probe_runtime(dataclasses.replace(manifest, batch_rows=False), path, RuntimeSettings(intra_op_threads=1))
    assert probe_batch(unbatched) == ()


class _ContendedRuntime:
    """A layer whose call of n rows takes ``cost[n]`` on a clock of its own, 3x as long for the
    calls numbered in ``spell`` (neighbours starting up on the same machine)."""

    batches = True

    def __init__(self, cost: dict[int, float], spell: range) -> None:
        self.manifest = types.SimpleNamespace(hidden_size=4, act_dtype="float32")
        self.cache = types.SimpleNamespace(truncate=lambda session, length: None)
        self.cost, self.spell, self.calls, self.now = cost, spell, 0, 0.0

    def _call(self, rows: int) -> np.ndarray:
        self.calls += 1
        self.now += self.cost[rows] * (3.0 if self.calls in self.spell else 1.0)
        return np.zeros((rows, 1, 4), np.float32)

    def run(self, session: str, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self._call(1)

    def run_batch(self, sessions: tuple[str, ...], x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        return self._call(len(sessions))

    def drop(self, session: str) -> None:
        pass


def test_a_spell_of_contention_does_not_skew_one_batch_size() -> None:
    """Four calls in a row slowed 3x: timed size by size they would all be 2-row calls, and the
    probe would say 2 rows cost 3.75x one step; interleaved, the rounds they hit are outvoted."""
    cost = {1: 1.0, 2: 1.25, 4: 1.5, 8: 2.0}
    runtime = _ContendedRuntime(cost, spell=range(17, 21))  # 8 prefills + a warm-up, then the probe's calls
    assert probe_batch(runtime, repeats=7, clock=lambda: runtime.now) == (1.25, 1.5, 2.0)  # type: ignore[arg-type]
