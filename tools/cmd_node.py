"""`linguamq node --broker URL --name NAME`: run the node daemon until stopped."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from linguamq.node.daemon import NodeDaemon, NodeSettings, status_will
from linguamq.tools.signals import tune_for_latency, wait_for_signal
from linguamq.topics import TopicError, validate_id
from linguamq.topics.client import MqttClient, MqttError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", required=True, metavar="URL", help="mqtt://HOST:PORT of the hub's broker")
    parser.add_argument("--name", required=True, help="this node's id ([A-Za-z0-9_-], at most 64)")
    parser.add_argument("--cluster", default="home", help="cluster name (default home)")
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/linguamq").expanduser(), metavar="DIR",
                        help="where fetched pieces are kept (default ~/.cache/linguamq)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0 = one per core)")
    parser.add_argument("--slowdown", type=float, default=1.0, metavar="X",
                        help="behave like a device X times slower (sleeps; for experiments)")
    parser.add_argument("--mem-budget", type=float, default=0.0, metavar="MB",
                        help="refuse assignments whose pieces exceed this many MB (0 = no budget)")
    parser.add_argument("--no-spin", action="store_true",
                        help="ONNX Runtime threads sleep between ops (several nodes on one machine)")


def run(args: argparse.Namespace) -> int:
    tune_for_latency()
    try:
        validate_id("node", args.name)
        validate_id("cluster", args.cluster)
        if args.slowdown < 1.0:
            raise ValueError(f"--slowdown must be >= 1, got {args.slowdown}")
        if args.mem_budget < 0 or args.threads < 0:
            raise ValueError("--mem-budget and --threads must be >= 0")
        settings = NodeSettings(name=args.name, cluster=args.cluster, cache_dir=args.cache, threads=args.threads,
                                slowdown=args.slowdown, mem_budget_mb=args.mem_budget, spin=not args.no_spin)
        client = MqttClient(url=args.broker, client_id=f"node-{args.name}",
                            will=status_will(args.cluster, args.name)).start()
    except (TopicError, MqttError, ValueError) as exc:
        print(f"linguamq node: error: {exc}", file=sys.stderr)
        return 2
    daemon = NodeDaemon(client=client, settings=settings)
    daemon.start()
    try:
        wait_for_signal()
    finally:
        daemon.stop()
        client.stop()
    return 0
