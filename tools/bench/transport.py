"""`linguamq bench transport`: one MQTT hop of an activation envelope, embedded broker vs mosquitto.

One hop is what an activation does between two stages: a publisher ``MqttClient`` publishes
an envelope on ``act/{piece}`` (QoS of ``topics.ACT``), the broker routes it, a subscriber
``MqttClient`` receives it and decodes it at the edge (``subscribe(topics.ACT, ...)``: the
handler gets the typed header and the array view, as a node does). Latency = the handler's
``perf_counter`` - the publisher's, just before ``publish``; both clients live in this
process. One message at a time (the next leaves once the last arrived), so the figure is
latency, not throughput.

Both brokers run in the same run, on 127.0.0.1: the embedded broker (``BrokerThread`` in a
child process, as in the hub, which is not the nodes' process) and mosquitto (started on a
free port with a temporary config, stopped by pid). Every round sends one message through
each broker, in alternating order, so that noise on a shared machine hits both alike.
Payloads: envelopes of float32 tensors of 8 KiB and 1 MiB. Reported per (broker, size):
median and p90 in ms; per size: embedded median / mosquitto median.
Targets: embedded median <= 1 ms at 8 KiB, and <= 1.5 x mosquitto's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Self

import numpy as np

from linguamq import topics
from linguamq.broker.process import embedded_broker
from linguamq.schemas import envelope
from linguamq.schemas.envelope import ActHeader
from linguamq.tools.testing.mosquitto import MosquittoError, mosquitto
from linguamq.topics.client import MqttClient

CLUSTER = "bench"
PIECE = 3
BROKERS = ("embedded", "mosquitto")
# (label, float32 tensor shape (batch, seq, hidden)): 8 KiB and 1 MiB of tensor bytes
SIZES = (("8KiB", (1, 1, 2048)), ("1MiB", (1, 256, 1024)))
TARGET_MEDIAN_MS = {"8KiB": 1.0}  # embedded broker, per size
TARGET_RATIO = 1.5  # embedded median / mosquitto median, every size
WAIT = 10.0  # seconds: bound of every wait (start, connect, one hop)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--count-small", type=_at_least(1), default=200, metavar="N",
                        help="timed hops per broker at 8 KiB (default: 200)")
    parser.add_argument("--count-large", type=_at_least(1), default=50, metavar="N",
                        help="timed hops per broker at 1 MiB (default: 50)")
    parser.add_argument("--warmup", type=_at_least(0), default=20, metavar="N",
                        help="untimed hops per broker and size first (default: 20)")
    parser.add_argument("--embedded-in", choices=("process", "thread"), default="process",
                        help="run the embedded broker in a child process, as the hub does for the "
                             "nodes (default), or on a thread of this process")
    parser.add_argument("--mosquitto", default=None, metavar="PATH",
                        help="mosquitto binary (default: found on PATH, else /usr/sbin/mosquitto)")
    parser.add_argument("--idle", type=float, default=0.0, metavar="MS",
                        help="pause before every hop, as a pipeline stage waits for its next turn: the "
                             "hop then wakes idle processes (default: 0, back to back)")


def _at_least(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    return parse


def run(args: argparse.Namespace) -> int:
    counts = {"8KiB": args.count_small, "1MiB": args.count_large}
    if args.idle < 0:
        raise SystemExit(f"linguamq bench transport: error: --idle must be >= 0, got {args.idle:g}")
    report = measure(counts=counts, warmup=args.warmup, embedded_in=args.embedded_in,
                     mosquitto=args.mosquitto, idle_ms=args.idle)
    print(json.dumps(report) if args.json else table(report))
    return 0


# --- measuring ------------------------------------------------------------------------------


def measure(*, counts: dict[str, int], warmup: int = 20, embedded_in: str = "process",
            mosquitto: str | None = None, idle_ms: float = 0.0) -> dict[str, Any]:
    """Run the bench; ``counts`` maps each size label of ``SIZES`` to its timed hops;
    ``idle_ms``: a pause before every hop."""
    with contextlib.ExitStack() as stack:
        urls = {"embedded": stack.enter_context(embedded_broker(embedded_in)),
                "mosquitto": stack.enter_context(mosquitto_broker(mosquitto))}
        links = {name: stack.enter_context(Link(url, name)) for name, url in urls.items()}
        results = [result for label, shape in SIZES
                   for result in _measure_size(links, label, shape, counts[label], warmup, idle_ms / 1e3)]
    ratios = {label: round(_median(results, "embedded", label) / _median(results, "mosquitto", label), 3)
              for label, _ in SIZES}
    targets = {f"embedded_median_{label}": _median(results, "embedded", label) <= ms
               for label, ms in TARGET_MEDIAN_MS.items()}
    targets.update({f"ratio_{label}": ratio <= TARGET_RATIO for label, ratio in ratios.items()})
    return {"bench": "transport", "python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "embedded_in": embedded_in, "qos": topics.ACT.qos, "idle_ms": idle_ms,
            "mosquitto_version": _mosquitto_version(mosquitto), "warmup": warmup,
            "results": results, "ratio_embedded_to_mosquitto": ratios,
            "targets": {"embedded_median_ms": TARGET_MEDIAN_MS, "ratio": TARGET_RATIO},
            "targets_met": targets}


def _measure_size(links: dict[str, Link], label: str, shape: tuple[int, ...], count: int,
                  warmup: int, idle_s: float) -> list[dict[str, Any]]:
    array = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    order = list(links)
    samples: dict[str, list[float]] = {name: [] for name in order}
    payload_bytes = 0
    for step in range(warmup + count):
        # Each round: one hop through each broker, the order swapped every round.
        for name in order if step % 2 == 0 else order[::-1]:
            payload = envelope.encode(ActHeader.for_tensor(
                array, session=f"s-{label}", step=step, epoch=1, piece=PIECE, start_pos=step), array)
            payload_bytes = len(payload)
            if idle_s:
                time.sleep(idle_s)
            seconds = links[name].hop(payload, session=f"s-{label}", step=step)
            if step >= warmup:
                samples[name].append(seconds * 1e3)
    return [{"broker": name, "size": label, "tensor_bytes": array.nbytes, "payload_bytes": payload_bytes,
             "count": len(ms), **_stats(ms)} for name, ms in samples.items()]


def _stats(ms: Sequence[float]) -> dict[str, float]:
    ordered = sorted(ms)
    p90 = ordered[min(len(ordered) - 1, max(0, round(0.9 * len(ordered)) - 1))]
    return {"median_ms": round(statistics.median(ordered), 4), "p90_ms": round(p90, 4),
            "min_ms": round(ordered[0], 4), "max_ms": round(ordered[-1], 4)}


def _median(results: list[dict[str, Any]], broker: str, size: str) -> float:
    return next(r["median_ms"] for r in results if r["broker"] == broker and r["size"] == size)


class Link:
    """A publisher and a subscriber ``MqttClient`` on one broker, subscribed to act/{PIECE}."""

    def __init__(self, url: str, tag: str) -> None:
        stamp = f"{tag}-{os.getpid()}"
        self.topic = topics.ACT.build(CLUSTER, piece=PIECE)
        self._inbox: queue.SimpleQueue[tuple[float, str, int]] = queue.SimpleQueue()
        self._pub = MqttClient(url=url, client_id=f"bench-pub-{stamp}")
        self._sub = MqttClient(url=url, client_id=f"bench-sub-{stamp}")
        self._sub.subscribe(topics.ACT, self.topic, self._received, on_reject=self._rejected)

    def _received(self, topic: str, value: tuple[ActHeader, np.ndarray], retained: bool) -> None:
        now = time.perf_counter()
        header, _ = value
        self._inbox.put((now, header.session, header.step))

    def _rejected(self, topic: str, payload: bytes, error: Exception) -> None:
        self._inbox.put((time.perf_counter(), f"rejected: {error}", -1))

    def __enter__(self) -> Self:
        self._sub.start(WAIT)
        try:
            self._pub.start(WAIT)
            self._wait_subscribed()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for client in (self._pub, self._sub):
            client.stop()

    def _wait_subscribed(self) -> None:
        """Our client does not expose SUBACK: probe until a message comes through."""
        probe = np.zeros((1, 4), dtype=np.float32)
        deadline = time.monotonic() + WAIT
        for step in range(10_000):
            payload = envelope.encode(ActHeader.for_tensor(
                probe, session="probe", step=step, epoch=1, piece=PIECE, start_pos=0), probe)
            self._pub.publish_raw(self.topic, payload, qos=topics.ACT.qos)
            with contextlib.suppress(_NotYet):
                self._await("probe", step, min(0.2, max(deadline - time.monotonic(), 0.0)))
                return
            if time.monotonic() > deadline:
                break
        raise BenchError(f"no message came through {self.topic} within {WAIT} s")

    def hop(self, payload: bytes, *, session: str, step: int) -> float:
        """Seconds from publish to the subscriber's handler, for one envelope."""
        sent = time.perf_counter()
        self._pub.publish_raw(self.topic, payload, qos=topics.ACT.qos)
        return self._await(session, step, WAIT) - sent

    def _await(self, session: str, step: int, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while True:  # skip late probes and duplicates (QoS 1 may redeliver)
            try:
                received, got_session, got_step = self._inbox.get(
                    timeout=max(deadline - time.monotonic(), 0.0))
            except queue.Empty:
                raise _NotYet(f"message {session}/{step} not received within {timeout:.1f} s") from None
            if got_step == -1:
                raise BenchError(f"the subscriber could not decode an envelope ({got_session})")
            if (got_session, got_step) == (session, step):
                return received


class BenchError(RuntimeError):
    """A broker would not start, or a message did not come through in time."""


class _NotYet(BenchError):
    """A message did not arrive within the wait."""


# --- brokers --------------------------------------------------------------------------------


@contextlib.contextmanager
def mosquitto_broker(binary: str | None = None) -> Iterator[str]:
    """mosquitto on a free 127.0.0.1 port (anonymous); yields its URL."""
    try:
        with mosquitto(binary=binary) as port:
            yield f"mqtt://127.0.0.1:{port}"
    except MosquittoError as exc:
        raise BenchError(f"{exc} (or pass --mosquitto)") from exc


def _mosquitto_version(binary: str | None) -> str | None:
    path = binary or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    try:  # `mosquitto -h` prints "mosquitto version X.Y.Z" and exits 3
        out = subprocess.run([path, "-h"], capture_output=True, text=True, timeout=WAIT, check=False).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    words = out.split()
    return words[2] if len(words) > 2 and words[:2] == ["mosquitto", "version"] else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop_child(proc: subprocess.Popen[Any]) -> None:
    if proc.stdin is not None:
        with contextlib.suppress(OSError):
            proc.stdin.close()  # the embedded child's cue to stop
    if proc.poll() is None and proc.stdin is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=WAIT)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=WAIT)
    if proc.stdout is not None:
        proc.stdout.close()


# --- output ---------------------------------------------------------------------------------


def table(report: dict[str, Any]) -> str:
    lines = [(f"one hop publish -> broker -> subscriber, act/{{piece}} QoS {report['qos']}, float32 envelopes "
              f"(python {report['python']}, mosquitto {report['mosquitto_version']}, {report['cpus']} cpus, "
              f"embedded broker in a {report['embedded_in']}, {report['warmup']} warm-up hops"
              + (f", {report['idle_ms']:g} ms idle before each hop" if report["idle_ms"] else "") + ")"),
             (f"{'broker':<10} {'size':>5} {'payload B':>10} {'n':>4} {'median ms':>10} {'p90 ms':>8} "
              f"{'min ms':>8} {'max ms':>8}")]
    for r in report["results"]:
        lines.append(f"{r['broker']:<10} {r['size']:>5} {r['payload_bytes']:>10} {r['count']:>4} "
                     f"{r['median_ms']:>10.3f} {r['p90_ms']:>8.3f} {r['min_ms']:>8.3f} {r['max_ms']:>8.3f}")
    for size, ratio in report["ratio_embedded_to_mosquitto"].items():
        lines.append(f"embedded / mosquitto median at {size}: {ratio:.2f}x "
                     f"(target <= {report['targets']['ratio']:g}x: "
                     f"{'ok' if report['targets_met'][f'ratio_{size}'] else 'MISSED'})")
    for size, ms in report["targets"]["embedded_median_ms"].items():
        met = report["targets_met"][f"embedded_median_{size}"]
        lines.append(f"embedded median at {size} <= {ms:g} ms: {'ok' if met else 'MISSED'}")
    return "\n".join(lines)
