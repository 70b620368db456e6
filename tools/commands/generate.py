"""`linguamq generate --broker URL --prompt TEXT` (or `--chat TEXT`): generate through a running cluster
(built on the Python API, ``linguamq.Client``). Ctrl-C cancels the request (exit 130)."""

from __future__ import annotations

import argparse
import json
import sys

import linguamq
from linguamq.errors import GenerationError, LinguamqError
from linguamq.tools.args import add_connection_arguments, add_generation_arguments, chat_messages, connection_kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", required=True, metavar="URL", help="mqtt://HOST:PORT of the hub's broker")
    parser.add_argument("--cluster", default="home", help="cluster name (default home)")
    add_generation_arguments(parser)
    parser.add_argument("--id", help="request id (default: random)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="give up after S seconds without a response (default 120)")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")
    add_connection_arguments(parser)  # a client-role user: requests/USER, responses/USER/+


def run(args: argparse.Namespace) -> int:
    try:
        messages = chat_messages(args)
        client = linguamq.Client(args.broker, cluster=args.cluster, timeout=args.timeout, **connection_kwargs(args))
        with client, client.stream(args.prompt, messages=messages, max_tokens=args.max_tokens, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop,
                                   request_id=args.id) as stream:
            for piece in stream:
                if not args.json:
                    _print_stream(piece)
        result = stream.result
    except GenerationError as exc:
        result = exc.result
    except (LinguamqError, ValueError) as exc:
        print(f"linguamq generate: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # leaving the stream has cancelled the request: the cluster stops too
        print("\nlinguamq generate: cancelled", file=sys.stderr)
        return 130
    assert result is not None
    if args.json:
        print(json.dumps({"tokens": list(result.tokens), "text": result.text, "ttft_ms": result.ttft_ms,
                          "ms_per_token": result.ms_per_token, "stop_reason": result.stop_reason,
                          "prompt_tokens": result.prompt_tokens, "error": result.error, "seed": result.seed}))
    else:
        print(flush=True)
        error = f" error: {result.error}" if result.error else ""
        print(f"[{len(result.tokens)} tokens, {result.stop_reason}; ttft {result.ttft_ms:.1f} ms, "
              f"{result.ms_per_token:.2f} ms/token; seed {result.seed}]{error}", file=sys.stderr)
    return 1 if result.stop_reason == "error" else 0


def _print_stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
