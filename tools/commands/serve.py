"""`linguamq serve --broker URL`: the OpenAI-compatible API and the dashboard of a running cluster.

The gateway is a client of the cluster (gateway/): it can run on any machine that reaches the
broker. On a secured cluster it logs in with a hub-role user (-u) to follow the cluster, and
every caller needs an API key (`linguamq users add NAME --role client` prints one).
"""

from __future__ import annotations

import argparse
import sys

from linguamq.gateway.app import GatewayServer
from linguamq.gateway.settings import GatewaySettings, check_exposure
from linguamq.tools.args import add_connection_arguments, add_http_arguments, connection_kwargs
from linguamq.tools.signals import wait_for_signal
from linguamq.topics import TopicError, validate_id
from linguamq.topics.client import MqttError

MODEL_WAIT_S = 3.0  # the manifest is retained: a running hub's arrives at once


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", required=True, metavar="URL", help="mqtt://HOST:PORT of the hub's broker")
    parser.add_argument("--cluster", default="home", help="cluster name (default home)")
    add_http_arguments(parser)
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="fail a request after S seconds without a response (default 120)")
    add_connection_arguments(parser)  # a secured cluster: a hub-role user, to follow its topics


def run(args: argparse.Namespace) -> int:
    try:
        validate_id("cluster", args.cluster)
        if not 0 <= args.port <= 65_535:
            raise ValueError(f"--port out of range: {args.port}")
        settings = GatewaySettings(broker_url=args.broker, cluster=args.cluster, timeout=args.timeout,
                                   **connection_kwargs(args))
        check_exposure(args.host, settings.keys_required, args.open)
        server = GatewayServer(settings, host=args.host, port=args.port).start()
    except (OSError, MqttError, TopicError, ValueError) as exc:
        print(f"linguamq serve: error: {exc}", file=sys.stderr)
        return 2
    if not server.gateway.view.wait_model(MODEL_WAIT_S):  # a silent ACL or no hub yet: say so, keep serving
        print(f"linguamq serve: warning: no model on cluster {args.cluster!r} yet: is its hub running, and may this "
              "login read the cluster's topics (on a secured cluster, a hub-role user: -u)?", file=sys.stderr)
    print(f"serving {server.url} (OpenAI API at {server.url}/v1, dashboard at {server.url}/), cluster "
          f"{args.cluster} on {args.broker}" + (", API keys required" if settings.keys_required else ""), flush=True)
    try:
        wait_for_signal()
    finally:
        server.stop()
    return 0
