"""`linguamq bench codec`: activation envelope encode/decode/forward speed.

Each op runs on a float32 tensor of each size, timed in batches; the figure is the median
time per op and the throughput it implies (tensor bytes / time, GB = 1e9 bytes). Decode is
zero-copy, so its time is the header's and barely grows with the tensor. Encode includes
building the header, as a node does every step; forward appends a hop to a received
envelope (header re-framed, tensor bytes copied once, never through numpy).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np

from linguamq.schemas import envelope
from linguamq.schemas.envelope import ActHeader, Hop

# (label, shape): (1, seq, hidden) float32 activations
SIZES = (("4KiB", (1, 1, 1024)), ("4MiB", (1, 256, 4096)))
# GB/s the 4 MiB figures must reach (decode is zero-copy; encode copies the tensor once)
TARGETS_GBPS = {("decode", "4MiB"): 2.0, ("encode", "4MiB"): 1.0}
HOP = Hop(node="bench", first=1, last=4, t_recv=1.0, t_start=1.0, t_end=1.0, t_send=1.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--samples", type=int, default=51, metavar="N",
                        help="timed batches per op and size; the median is reported (default: 51)")
    parser.add_argument("--batch-seconds", type=float, default=0.01, metavar="S",
                        help="rough length of one timed batch (default: 0.01)")
    parser.add_argument("--hops", type=int, default=4, metavar="N",
                        help="trace hops already in the header, as mid-pipeline (default: 4)")


def run(args: argparse.Namespace) -> int:
    results = [measure(op, label, shape, args) for label, shape in SIZES for op in ("encode", "decode", "forward")]
    report = {"bench": "codec", "python": platform.python_version(), "numpy": np.__version__,
              "machine": platform.machine(), "hops": args.hops, "samples": args.samples, "results": results}
    print(json.dumps(report) if args.json else table(report))
    return 0


def measure(op: str, label: str, shape: tuple[int, ...], args: argparse.Namespace) -> dict:
    array = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    fields = {"session": "bench", "request": "r1", "step": 7, "epoch": 1, "piece": 1, "start_pos": 42,
              "hops": (HOP,) * args.hops}
    payload = envelope.encode(ActHeader.for_tensor(array, **fields), array)
    work: Callable[[], object] = {
        "encode": lambda: envelope.encode(ActHeader.for_tensor(array, **fields), array),
        "decode": lambda: envelope.decode(payload),
        "forward": lambda: envelope.forward(payload, HOP),
    }[op]
    per_op = median_seconds(work, samples=args.samples, batch_seconds=args.batch_seconds)
    gb_per_s = round(array.nbytes / per_op / 1e9, 3)
    result = {"op": op, "size": label, "tensor_bytes": array.nbytes, "payload_bytes": len(payload),
              "median_us": round(per_op * 1e6, 3), "gb_per_s": gb_per_s}
    target = TARGETS_GBPS.get((op, label))
    if target is not None:
        result.update(target_gb_per_s=target, meets_target=gb_per_s >= target)
    return result


def median_seconds(work: Callable[[], object], *, samples: int, batch_seconds: float) -> float:
    """Median over ``samples`` batches of the time per call; the batch size is calibrated
    so that a batch lasts about ``batch_seconds`` (timer resolution stays negligible)."""
    start = time.perf_counter()
    work()  # warm up, and a first estimate
    batch = max(1, int(batch_seconds / max(time.perf_counter() - start, 1e-9)))
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        times = []
        for _ in range(samples):
            start = time.perf_counter()
            for _ in range(batch):
                work()
            times.append((time.perf_counter() - start) / batch)
    finally:
        if gc_was_enabled:
            gc.enable()
    return statistics.median(times)


def table(report: dict) -> str:
    lines = [(f"envelope codec, float32, {report['hops']} hops in the header, median of {report['samples']} batches "
              f"(python {report['python']}, numpy {report['numpy']}, {report['machine']})"),
             f"{'op':<8} {'size':>5} {'payload B':>10} {'median us':>11} {'GB/s':>9}  target"]
    for r in report["results"]:
        target = (f">= {r['target_gb_per_s']:g} GB/s {'ok' if r['meets_target'] else 'MISSED'}"
                  if "target_gb_per_s" in r else "")
        lines.append(f"{r['op']:<8} {r['size']:>5} {r['payload_bytes']:>10} {r['median_us']:>11.1f} "
                     f"{r['gb_per_s']:>9.2f}  {target}")
    return "\n".join(lines)
