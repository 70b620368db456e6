"""`linguamq hub --artifacts ARTDIR`: broker + manifest + planner + head for one cluster."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from linguamq.broker.embedded import (
    DEFAULT_MAX_INFLIGHT_MESSAGES,
    DEFAULT_MAX_QUEUED_BYTES,
    DEFAULT_MAX_QUEUED_MESSAGES,
    DEFAULT_SESSION_EXPIRY_S,
    DEFAULT_TLS_PORT,
)
from linguamq.broker.errors import BrokerError
from linguamq.broker.process import BrokerOptions
from linguamq.gateway.settings import check_exposure
from linguamq.schemas.errors import SchemaError
from linguamq.tools.args import add_connection_arguments, add_http_arguments, connection_kwargs
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
    sessions = parser.add_argument_group("what the embedded broker keeps for each client (as mosquitto's settings)")
    sessions.add_argument("--max-inflight-messages", type=int, metavar="N",
                          help=f"QoS 1/2 messages a client may leave unacknowledged (default {DEFAULT_MAX_INFLIGHT_MESSAGES})")
    sessions.add_argument("--max-queued-messages", type=int, metavar="N",
                          help="messages waiting behind those, or for a client with a persistent session that is "
                               f"away; beyond that the newest are dropped and counted (default {DEFAULT_MAX_QUEUED_MESSAGES})")
    sessions.add_argument("--max-queued-bytes", type=int, metavar="B",
                          help="the same in bytes; also bounds QoS 0 messages waiting for a client that reads "
                               f"slowly (default {DEFAULT_MAX_QUEUED_BYTES // 2**20} MiB; 0 = no limit)")
    sessions.add_argument("--session-expiry", type=float, metavar="S",
                          help="a persistent session whose client stays away S seconds ends "
                               f"(default {DEFAULT_SESSION_EXPIRY_S:g})")
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
    parser.add_argument("--max-tokens", type=int, default=0, metavar="N",
                        help="refuse requests asking for more than N new tokens (default 0 = the model's context)")
    parser.add_argument("--rate", type=float, default=0.0, metavar="R",
                        help="requests per second per client (the user of requests/{c}, else the request's `client` field); "
                             "excess answered rate_limited "
                             "(default 0 = no limit)")
    parser.add_argument("--burst", type=int, default=10, metavar="B",
                        help="requests a client may send at once before --rate applies (default 10)")
    parser.add_argument("--prefill-chunk", type=int, default=256, metavar="N",
                        help="send prompts in chunks of N tokens: nodes serve other requests between chunks and "
                             "stages work on successive chunks at once (default 256; 0 = whole prompts)")
    parser.add_argument("--no-ring", dest="ring", action="store_false",
                        help="the head sends every decode step itself (by default the stage that samples sends the "
                             "next step straight to the first stage, and the head only watches the tokens)")
    parser.add_argument("--json", action="store_true", help="print the ready line as JSON")
    http = parser.add_argument_group("HTTP (OpenAI API and dashboard, as `linguamq serve`)")
    http.add_argument("--http", type=int, metavar="PORT", help="serve them on PORT (0 = any free)")
    http.add_argument("--http-host", default="127.0.0.1", metavar="ADDR", help="on this address (default 127.0.0.1)")
    add_http_arguments(http, port=None)
    security = parser.add_argument_group("security (see `linguamq users`, `linguamq tls init`)")
    security.add_argument("--users", type=Path, metavar="F",
                          help="users file: only its users connect, each limited to its role's topics")
    security.add_argument("--tls-cert", type=Path, metavar="F", help="server certificate (PEM) for a TLS listener")
    security.add_argument("--tls-key", type=Path, metavar="F", help="its private key (PEM)")
    security.add_argument("--tls-port", type=int, default=DEFAULT_TLS_PORT, metavar="N",
                          help=f"TLS listener port; 0 = any free (default {DEFAULT_TLS_PORT})")
    security.add_argument("--tls-only", action="store_true", help="no plaintext listener (--port is unused)")
    add_connection_arguments(security)  # with --broker: a hub-role user; --cafile: the CA of --tls-cert


def _broker_options(args: argparse.Namespace) -> BrokerOptions:
    if (args.tls_cert is None) != (args.tls_key is None):
        raise ValueError("--tls-cert and --tls-key go together")
    if args.tls_only and args.tls_cert is None:
        raise ValueError("--tls-only needs --tls-cert and --tls-key")
    if args.broker and (args.users or args.tls_cert):
        raise ValueError("--users and --tls-* secure the embedded broker; with --broker, secure that broker "
                         "(`linguamq users export-mosquitto`) and log in with --username")
    limits = {"--max-inflight-messages": args.max_inflight_messages, "--max-queued-messages": args.max_queued_messages,
              "--max-queued-bytes": args.max_queued_bytes, "--session-expiry": args.session_expiry}
    for flag, value in limits.items():
        if value is not None and args.broker:
            raise ValueError(f"{flag} is a setting of the embedded broker; with --broker, set it on that broker")
        if value is not None and not value > 0 and flag != "--max-queued-bytes":
            raise ValueError(f"{flag} must be positive, got {value}")
    if args.max_inflight_messages is not None and args.max_inflight_messages > 65_535:
        raise ValueError(f"--max-inflight-messages must be at most 65535 (MQTT packet ids), "
                         f"got {args.max_inflight_messages}")
    if args.max_queued_bytes is not None and args.max_queued_bytes < 0:
        raise ValueError(f"--max-queued-bytes must be >= 0 (0: no limit), got {args.max_queued_bytes}")
    if not 0 <= args.tls_port <= 65_535:
        raise ValueError(f"--tls-port out of range: {args.tls_port}")
    for path in (args.users, args.tls_cert, args.tls_key):
        if path is not None and not path.is_file():
            raise ValueError(f"no such file: {path}")
    return BrokerOptions(users=args.users, tls_cert=args.tls_cert, tls_key=args.tls_key, tls_port=args.tls_port,
                         tls_only=args.tls_only, max_inflight_messages=args.max_inflight_messages,
                         max_queued_messages=args.max_queued_messages, max_queued_bytes=args.max_queued_bytes,
                         session_expiry_s=args.session_expiry)


def _hub_cafile(args: argparse.Namespace) -> str | None:
    """The CA the hub's own clients verify a TLS-only embedded broker with: --cafile, or the
    ca.crt that `linguamq tls init` wrote beside the certificate."""
    if args.cafile or not args.tls_only:
        return args.cafile
    beside = args.tls_cert.parent / "ca.crt"
    if not beside.is_file():
        raise ValueError("--tls-only: give --cafile (the CA that signed --tls-cert), so that the hub's own "
                         "clients can verify it")
    return str(beside)


def run(args: argparse.Namespace) -> int:
    tune_for_latency()
    if args.plan_sessions < 1 or not args.drift_ratio > 1:
        print("linguamq hub: error: --plan-sessions must be >= 1 and --drift-ratio > 1", file=sys.stderr)
        return 2
    if args.max_tokens < 0 or args.rate < 0 or args.burst < 1 or args.prefill_chunk < 0:
        print("linguamq hub: error: --max-tokens, --rate and --prefill-chunk must be >= 0, --burst >= 1",
              file=sys.stderr)
        return 2
    try:
        validate_id("cluster", args.cluster)
        options, login = _broker_options(args), connection_kwargs(args)
        login["cafile"] = _hub_cafile(args)
        if args.http is not None:
            if not 0 <= args.http <= 65_535:
                raise ValueError(f"--http port out of range: {args.http}")
            check_exposure(args.http_host, args.users is not None or login["username"] is not None, args.open)
        hub = Hub(HubSettings(artifacts=args.artifacts, cluster=args.cluster, host=args.host, port=args.port,
                              broker_url=args.broker, min_nodes=args.min_nodes, settle_s=args.settle,
                              objective=args.objective, broker_in_process=not args.broker_thread,
                              plan_sessions=args.plan_sessions, drift_ratio=args.drift_ratio,
                              max_tokens=args.max_tokens, rate=args.rate, burst=args.burst,
                              prefill_chunk=args.prefill_chunk, ring=args.ring, broker_options=options, http_port=args.http, http_host=args.http_host,
                              **login)).start()
    except (OSError, SchemaError, TopicError, MqttError, BrokerError, ValueError) as exc:
        print(f"linguamq hub: error: {exc}", file=sys.stderr)
        return 2
    ready = {"event": "hub_ready", "broker": hub.url, "cluster": args.cluster, "model": hub.manifest.name,
             "pieces": len(hub.manifest.pieces), "tls": hub.tls_url, "users": args.users is not None,
             "http": hub.http.url if hub.http else None}
    print(json.dumps(ready) if args.json else f"hub ready: broker {hub.url}, cluster {args.cluster}, "
          f"model {hub.manifest.name} ({len(hub.manifest.pieces)} pieces)"
          + (f", TLS {hub.tls_url}" if hub.tls_url and hub.tls_url != hub.url else "")
          + (", users and ACLs on" if args.users else "")
          + (f", HTTP {hub.http.url} (OpenAI API /v1, dashboard /)" if hub.http else ""), flush=True)
    try:
        wait_for_signal()
    finally:
        hub.stop()
    return 0
