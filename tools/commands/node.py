"""`linguamq node --broker URL --name NAME`: run the node daemon until stopped."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from linguamq.node.daemon import MAX_BATCH, NodeDaemon, NodeSettings, status_will
from linguamq.tools.args import add_connection_arguments, connection_kwargs
from linguamq.tools.signals import tune_for_latency, wait_for_signal
from linguamq.topics import TopicError, validate_id
from linguamq.topics.client import MqttClient, MqttError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", required=True, metavar="URL", help="mqtt://HOST:PORT of the hub's broker")
    parser.add_argument("--name", help="this node's id ([A-Za-z0-9_-], at most 64; default: --username)")
    parser.add_argument("--cluster", default="home", help="cluster name (default home)")
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/linguamq").expanduser(), metavar="DIR",
                        help="where fetched pieces are kept (default ~/.cache/linguamq)")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0 = one per core)")
    parser.add_argument("--slowdown", type=float, default=1.0, metavar="X",
                        help="behave like a device X times slower (sleeps; for experiments)")
    parser.add_argument("--mem-budget", type=float, default=0.0, metavar="MB",
                        help="refuse assignments whose pieces exceed this many MB (0 = no budget)")
    parser.add_argument("--kv-max-mb", type=float, default=1024.0, metavar="MB",
                        help="KV cache bound; least recently used sessions are evicted beyond it (default 1024)")
    parser.add_argument("--kv-ttl", type=float, default=600.0, metavar="S",
                        help="drop a session's KV cache after S idle seconds (default 600)")
    parser.add_argument("--max-sessions", type=int, default=0, metavar="N",
                        help="sessions this node holds at once; a new one beyond is refused as overloaded "
                             "(default 0 = no cap)")
    parser.add_argument("--max-envelope-mb", type=float, default=64.0, metavar="MB",
                        help="refuse larger payloads before decoding them (default 64, the broker's cap)")
    parser.add_argument("--no-spin", action="store_true",
                        help="ONNX Runtime threads sleep between ops (several nodes on one machine)")
    parser.add_argument("--no-merge", action="store_true",
                        help="run each layer as its own graph; by default a segment's layers are merged into "
                             "one graph (faster; needs the onnx package and disk for a copy of the segment)")
    parser.add_argument("--max-batch", type=int, default=8, metavar="N",
                        help="run decode steps of up to N sessions waiting here as one call (default 8; "
                             "1 = one at a time). Exports with --quantize int8 always run one at a time")
    add_connection_arguments(parser)  # a node-role user whose name is the node's --name


def run(args: argparse.Namespace) -> int:
    tune_for_latency()
    try:
        login = connection_kwargs(args)
        args.name = _node_name(args.name, args.username)
        validate_id("node", args.name)
        validate_id("cluster", args.cluster)
        if args.slowdown < 1.0:
            raise ValueError(f"--slowdown must be >= 1, got {args.slowdown}")
        if min(args.mem_budget, args.threads, args.kv_max_mb, args.kv_ttl, args.max_sessions) < 0:
            raise ValueError("--mem-budget, --threads, --kv-max-mb, --kv-ttl and --max-sessions must be >= 0")
        if not 1 <= args.max_batch <= MAX_BATCH:
            raise ValueError(f"--max-batch must be between 1 and {MAX_BATCH}, got {args.max_batch}")
        if not args.max_envelope_mb > 0:
            raise ValueError(f"--max-envelope-mb must be > 0, got {args.max_envelope_mb}")
        settings = NodeSettings(name=args.name, cluster=args.cluster, cache_dir=args.cache, threads=args.threads,
                                slowdown=args.slowdown, mem_budget_mb=args.mem_budget, spin=not args.no_spin,
                                kv_max_mb=args.kv_max_mb, kv_ttl_s=args.kv_ttl, max_sessions=args.max_sessions,
                                max_envelope_mb=args.max_envelope_mb, merge_layers=not args.no_merge,
                                max_batch=args.max_batch)
        client = MqttClient(url=args.broker, client_id=f"node-{args.name}",
                            will=status_will(args.cluster, args.name), **login).start()
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


def _node_name(name: str | None, username: str | None) -> str:
    """A secured broker lets node U use only U's topics, so the name is the username."""
    if name is None and username is None:
        raise ValueError("--name is required (or --username: the node takes its name)")
    if name is not None and username is not None and name != username:
        raise ValueError(f"--name {name} differs from --username {username}: a node may only use the topics "
                         "of its own user (nodes/USERNAME/...)")
    return name if name is not None else username  # type: ignore[return-value]
