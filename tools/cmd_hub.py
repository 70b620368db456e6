"""`linguamq hub --artifacts ARTDIR`: broker + manifest + planner + head for one cluster."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from linguamq.broker.errors import BrokerError
from linguamq.schemas.errors import SchemaError
from linguamq.tools.hub import Hub, HubSettings
from linguamq.tools.signals import tune_for_latency, wait_for_signal
from linguamq.topics import TopicError, validate_id
from linguamq.topics.client import MqttError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--artifacts", required=True, type=Path, metavar="ARTDIR",
                        help="directory written by `linguamq export`")
    parser.add_argument("--host", default="127.0.0.1", help="embedded broker address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=1883, help="embedded broker port; 0 = any free (default 1883)")
    parser.add_argument("--broker", metavar="URL", help="use this external broker (mqtt://host:port) instead")
    parser.add_argument("--broker-thread", action="store_true",
                        help="run the embedded broker as a thread of the hub (default: its own process)")
    parser.add_argument("--cluster", default="home", help="cluster name (default home)")
    parser.add_argument("--min-nodes", type=int, default=1, help="nodes to wait for before the first plan")
    parser.add_argument("--settle", type=float, default=1.0, metavar="S",
                        help="seconds the node set must be stable before replanning (default 1)")
    parser.add_argument("--objective", choices=("latency", "throughput", "even"), default="latency",
                        help="what the planner optimises; even = LinguaLinked's baseline split (default latency)")
    parser.add_argument("--plan-sessions", type=int, default=1, metavar="N",
                        help="sessions the planner plans for: KV memory on each node, and sessions in flight "
                             "for --objective throughput (default 1)")
    parser.add_argument("--drift-ratio", type=float, default=1.3, metavar="R",
                        help="replan when a node's measured stage time stays this far off the prediction; "
                             "inf: never replan on drift (default 1.3)")
    parser.add_argument("--json", action="store_true", help="print the ready line as JSON")


def run(args: argparse.Namespace) -> int:
    tune_for_latency()
    if args.plan_sessions < 1 or not args.drift_ratio > 1:
        print("linguamq hub: error: --plan-sessions must be >= 1 and --drift-ratio > 1", file=sys.stderr)
        return 2
    try:
        validate_id("cluster", args.cluster)
        hub = Hub(HubSettings(artifacts=args.artifacts, cluster=args.cluster, host=args.host, port=args.port,
                              broker_url=args.broker, min_nodes=args.min_nodes, settle_s=args.settle,
                              objective=args.objective, broker_in_process=not args.broker_thread,
                              plan_sessions=args.plan_sessions, drift_ratio=args.drift_ratio)).start()
    except (OSError, SchemaError, TopicError, MqttError, BrokerError) as exc:
        print(f"linguamq hub: error: {exc}", file=sys.stderr)
        return 2
    ready = {"event": "hub_ready", "broker": hub.url, "cluster": args.cluster, "model": hub.manifest.name,
             "pieces": len(hub.manifest.pieces)}
    print(json.dumps(ready) if args.json else f"hub ready: broker {hub.url}, cluster {args.cluster}, "
          f"model {hub.manifest.name} ({len(hub.manifest.pieces)} pieces)", flush=True)
    try:
        wait_for_signal()
    finally:
        hub.stop()
    return 0
