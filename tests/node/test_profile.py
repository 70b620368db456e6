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

from linguamq.node.profile import RowMeter, probe_batch, probe_compute, probe_runtime, work_clock
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


class _Clocks:
    """A worker thread's and the process's CPU clocks, moved by hand."""

    def __init__(self) -> None:
        self.thread = self.process = 0.0

    def compute(self, s: float) -> None:
        self.thread += s
        self.process += s


def _meter(clocks: _Clocks, **kwargs) -> RowMeter:
    return RowMeter(lambda: clocks.thread, process_clock=lambda: clocks.process, **kwargs)


def _calls(meter: RowMeter, clocks: _Clocks, n: int, *, rows: int, compute_s: float, outside_s: float) -> None:
    for _ in range(n):
        meter.compute_started()
        clocks.compute(compute_s)
        meter.computed(rows)
        clocks.process += outside_s


def test_a_steps_row_cost_is_the_process_cpu_outside_compute_over_the_steps_of_batches() -> None:
    clocks = _Clocks()
    meter = _meter(clocks, min_rows=20)
    _calls(meter, clocks, 10, rows=3, compute_s=0.012, outside_s=0.006)  # 12 ms of compute, 6 of messages
    assert meter.sample() == pytest.approx(2.0)  # 60 ms outside compute over 30 steps
    _calls(meter, clocks, 9, rows=2, compute_s=0.010, outside_s=0.002)
    assert meter.sample() == pytest.approx(2.0)  # 18 steps of the 20 a window needs: still open
    _calls(meter, clocks, 6, rows=2, compute_s=0.010, outside_s=0.002)
    assert meter.sample() == pytest.approx(0.8 * 2.0 + 0.2 * 1.0)  # 30 ms over 30 steps, averaged in
    # One step a call: most of it per call, which a batch's extra sessions do not pay
    _calls(meter, clocks, 40, rows=1, compute_s=0.004, outside_s=0.004)
    assert meter.sample() == pytest.approx(1.8)


def test_a_call_under_way_when_a_window_closes_is_split_between_the_windows() -> None:
    """A long prefill straddling two windows: each pays for its own part of the compute."""
    clocks = _Clocks()
    meter = _meter(clocks, min_rows=2)
    _calls(meter, clocks, 2, rows=2, compute_s=0.010, outside_s=0.002)
    meter.compute_started()
    clocks.compute(0.3)  # half of a prefill
    assert meter.sample() == pytest.approx(1.0)  # 4 ms outside the compute over 4 steps
    clocks.compute(0.3)
    meter.computed(2)
    clocks.process += 0.004
    _calls(meter, clocks, 1, rows=2, compute_s=0.010, outside_s=0.004)
    assert meter.sample() == pytest.approx(0.8 * 1.0 + 0.2 * 2.0)  # 8 ms over 4 steps, not 8 - 300


def test_a_slow_node_is_measured_over_a_longer_window() -> None:
    clocks, wall = _Clocks(), [0.0]
    meter = RowMeter(lambda: clocks.thread, process_clock=lambda: clocks.process, wall_clock=lambda: wall[0],
                     min_rows=20, max_window_s=10.0)
    for _ in range(4):  # 4 steps a second: four reports before the window holds 20
        _calls(meter, clocks, 2, rows=2, compute_s=0.05, outside_s=0.003)
        wall[0] += 1.0
        assert meter.sample() is None
    _calls(meter, clocks, 2, rows=2, compute_s=0.05, outside_s=0.003)
    assert meter.sample() == pytest.approx(1.5)
    wall[0] += 11.0
    _calls(meter, clocks, 2, rows=2, compute_s=0.05, outside_s=0.5)
    assert meter.sample() == pytest.approx(1.5)  # 10 s without 20 steps: dropped, nothing sampled
    for _ in range(5):  # idle: telemetry, polls; a window starts with the next steps
        clocks.process += 0.01
        wall[0] += 1.0
        assert meter.sample() == pytest.approx(1.5)
    _calls(meter, clocks, 10, rows=2, compute_s=0.05, outside_s=0.001)
    assert meter.sample() == pytest.approx(0.8 * 1.5 + 0.2 * 0.5)  # not the idle 50 ms over 20 steps


def test_a_window_with_other_work_in_it_is_not_a_steps_cost() -> None:
    """Loading a segment, probing, fetching pieces: CPU no session step spent."""
    clocks = _Clocks()
    meter = _meter(clocks, min_rows=1)
    with meter.other_work():
        clocks.process += 2.0  # a load, across two windows
        _calls(meter, clocks, 5, rows=2, compute_s=0.004, outside_s=0.002)
        assert meter.sample() is None
        _calls(meter, clocks, 5, rows=2, compute_s=0.004, outside_s=0.002)
    assert meter.sample() is None  # the load ended within this window
    _calls(meter, clocks, 5, rows=2, compute_s=0.004, outside_s=0.002)
    assert meter.sample() == pytest.approx(1.0)
    meter.reset()  # a new segment
    assert meter.row_ms is None
