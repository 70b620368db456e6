"""`linguamq chat --broker URL`: an interactive chat with the cluster's model, in the terminal.

Each line read is a user message; the answer streams back as it is generated. The whole
conversation goes with every request (the hub renders it with the model's chat template),
so the model sees what was said before. Ctrl-C during an answer stops that answer (the
turn is forgotten, as is one the cluster failed); Ctrl-D (end of input) ends the chat, as
does a model without a chat template. Piped input works: one message a
line, and then only the answers are printed.
"""

from __future__ import annotations

import argparse
import sys

import linguamq
from linguamq.errors import GenerationError, LinguamqError
from linguamq.hub.chat import NO_TEMPLATE
from linguamq.schemas.requests import ChatMessage, GenerateResult
from linguamq.tools.args import add_connection_arguments, connection_kwargs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", required=True, metavar="URL", help="mqtt://HOST:PORT of the hub's broker")
    parser.add_argument("--cluster", default="home", help="cluster name (default home)")
    parser.add_argument("--system", metavar="TEXT", help="a system message that starts the conversation")
    parser.add_argument("--max-tokens", type=int, default=256, metavar="N", help="tokens per answer (default 256)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1.0 = off (default)")
    parser.add_argument("--timeout", type=float, default=120.0, metavar="S",
                        help="give up on an answer after S seconds without a response (default 120)")
    add_connection_arguments(parser)


def run(args: argparse.Namespace) -> int:
    history = [ChatMessage(role="system", content=args.system)] if args.system else []
    try:
        client = linguamq.Client(args.broker, cluster=args.cluster, timeout=args.timeout, **connection_kwargs(args))
        with client:
            while (line := _read_line()) is not None:
                if line.strip():
                    history = _turn(client, history, ChatMessage(role="user", content=line), args)
    except (LinguamqError, ValueError) as exc:
        print(f"linguamq chat: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _read_line() -> str | None:
    """The next message; None at the end of input. A prompt only for a person at a terminal."""
    try:
        return input("> " if sys.stdin.isatty() else "")
    except EOFError:
        return None


def _turn(client: linguamq.Client, history: list[ChatMessage], message: ChatMessage,
          args: argparse.Namespace) -> list[ChatMessage]:
    """Ask with the history plus `message`; the history with both sides of the exchange, or
    unchanged when there was no answer (an error, Ctrl-C): the next turn does not see it."""
    asked = [*history, message]
    result = _answer(client, asked, args)
    if result is None or result.stop_reason in ("error", "cancelled"):
        return history
    return [*asked, ChatMessage(role="assistant", content=result.text)]


def _answer(client: linguamq.Client, messages: list[ChatMessage], args: argparse.Namespace) -> GenerateResult | None:
    """Stream one answer to stdout; its result, or None if it was stopped or failed."""
    try:
        with client.stream(messages=messages, max_tokens=args.max_tokens, temperature=args.temperature,
                           top_p=args.top_p) as stream:
            for piece in stream:
                sys.stdout.write(piece)
                sys.stdout.flush()
        print(flush=True)
        return stream.result
    except GenerationError as exc:
        if exc.result.error == NO_TEMPLATE:
            raise  # every turn would fail alike: the chat ends
        print(f"\nlinguamq chat: {exc}", file=sys.stderr)
    except KeyboardInterrupt:  # leaving the stream has cancelled the request
        print("\n[stopped]", file=sys.stderr)
    return None
