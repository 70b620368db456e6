"""`linguamq trace`: watch requests cross the pipeline, live or from a recording.

Live: ``linguamq trace --broker URL [--cluster NAME] [--request ID] [--record FILE.jsonl]
[--duration S]`` redraws a table every second on a terminal (plain lines otherwise).
Offline: ``linguamq trace --from FILE.jsonl [--perfetto OUT.json] [--png OUT.png]``.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from pathlib import Path

from linguamq.tools.args import add_connection_arguments, connection_kwargs
from linguamq.tools.trace.model import TraceError, accounting
from linguamq.tools.trace.records import load
from linguamq.tools.trace.tracer import Tracer, TracerSettings
from linguamq.tools.trace.view import LiveView, render
from linguamq.topics.client import MqttError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", default="mqtt://127.0.0.1:1883", help="broker URL (live)")
    parser.add_argument("--cluster", default="home")
    parser.add_argument("--request", help="follow only this request id")
    parser.add_argument("--record", type=Path, help="write every observed event to this JSONL file")
    parser.add_argument("--duration", type=float, help="stop after this many seconds (live)")
    parser.add_argument("--from", dest="source", type=Path, help="read a recorded JSONL trace instead of a broker")
    parser.add_argument("--perfetto", type=Path, help="with --from: write Chrome/Perfetto trace-event JSON")
    parser.add_argument("--png", type=Path, help="with --from: write a Gantt chart (needs linguamq[viz])")
    parser.add_argument("--json", action="store_true", help="with --from: print a JSON summary")
    add_connection_arguments(parser)  # live, on a secured cluster: a hub-role user (it reads everything)


def run(args: argparse.Namespace) -> int:
    try:
        return _offline(args) if args.source else _live(args)
    except (TraceError, MqttError, OSError, ValueError) as exc:
        print(f"linguamq trace: {exc}", file=sys.stderr)
        return 1


def _live(args: argparse.Namespace) -> int:
    if args.perfetto or args.png:
        raise TraceError("--perfetto and --png read a recording: record with --record, then use --from")
    settings = TracerSettings(cluster=args.cluster, request=args.request, record=args.record,
                              results=args.request is not None)  # one request's responses cost little
    deadline = time.monotonic() + args.duration if args.duration else None
    stopping = threading.Event()
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: stopping.set()) if main else None
    try:
        with Tracer(url=args.broker, settings=settings, login=connection_kwargs(args)) as tracer:
            view = LiveView(tracer.model, out=sys.stdout, tty=sys.stdout.isatty())
            try:
                while not stopping.wait(1.0 if deadline is None else
                                        max(0.0, min(1.0, deadline - time.monotonic()))):
                    view.tick()
                    if deadline is not None and time.monotonic() >= deadline:
                        break
            except KeyboardInterrupt:
                pass
            time.sleep(0.2)  # the last outputs and pongs in flight
            view.tick()
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
    if args.record:
        print(f"recorded {tracer.written} events to {args.record}", file=sys.stderr)
    return 0


def _offline(args: argparse.Namespace) -> int:
    model = load(args.source, request=args.request)
    if args.perfetto or args.png:
        from linguamq.tools.trace.export import write_perfetto, write_png
        if args.perfetto:
            write_perfetto(model, args.perfetto)
        if args.png:
            write_png(model, args.png)
    requests = sorted({s.request for s in model.snapshot() if s.request})
    if args.json:
        summary = {"steps": model.step_count, "nodes": model.nodes(), "epochs": model.epochs(),
                   "requests": {r: _safe_accounting(model, r) for r in requests}}
        print(json.dumps(summary, indent=2))
    else:
        sys.stdout.write(render(model, steps=20))
        for r in requests:
            acc = _safe_accounting(model, r)
            if acc:
                print(f"{r}: per decode step, pipeline {acc['pipeline_ms']:.2f} ms + head {acc['head_ms']:.2f} ms = "
                      f"{acc['cycle_ms']:.2f} ms; observed {acc['observed_ms_per_token']:.2f} ms/token"
                      + (f", head says {acc['head_ms_per_token']:.2f}" if "head_ms_per_token" in acc else ""))
    return 0


def _safe_accounting(model, request: str) -> dict[str, float] | None:
    try:
        return accounting(model, request)
    except TraceError:
        return None
