"""Command-line arguments shared by several commands (light: no model code imported)."""

from __future__ import annotations

import argparse
import os
from typing import TypedDict

from linguamq.schemas.requests import ChatMessage


def add_generation_arguments(parser: argparse.ArgumentParser) -> None:
    """--prompt or --chat (and --system), --max-tokens, sampling and --stop, as run-local and
    generate take them."""
    text = parser.add_mutually_exclusive_group(required=True)
    text.add_argument("--prompt", help="prompt text, given to the model as it is")
    text.add_argument("--chat", metavar="TEXT",
                      help="a user message, rendered with the model's chat template (for instruct models)")
    parser.add_argument("--system", metavar="TEXT", help="a system message before --chat")
    parser.add_argument("--max-tokens", type=int, default=64, metavar="N", help="tokens to generate (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off (default)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1.0 = off (default)")
    parser.add_argument("--seed", type=int, default=None,
                        help="sampling seed (default: a fresh one, reported at the end: pass it to replay)")
    parser.add_argument("--stop", action="append", default=[], metavar="STR",
                        help="stop once the text contains STR (repeatable)")


def chat_messages(args: argparse.Namespace) -> tuple[ChatMessage, ...]:
    """The conversation of --system and --chat; () for --prompt. ValueError for --system alone."""
    if args.chat is None:
        if args.system is not None:
            raise ValueError("--system goes with --chat (a prompt has no chat template)")
        return ()
    system = (ChatMessage(role="system", content=args.system),) if args.system is not None else ()
    return (*system, ChatMessage(role="user", content=args.chat))


def add_http_arguments(parser: argparse._ActionsContainer, *, port: int | None = 8000) -> None:
    """--host/--port (for `serve`) or --http-host (for `hub`, whose --port is the broker's)."""
    if port is not None:
        parser.add_argument("--host", default="127.0.0.1", help="HTTP address (default 127.0.0.1)")
        parser.add_argument("--port", type=int, default=port, help=f"HTTP port; 0 = any free (default {port})")
    parser.add_argument("--open", action="store_true",
                        help="serve an open cluster (no users file, so no API keys) on an address other than "
                             "loopback: anyone who reaches it can use the model")


PASSWORD_ENV = "LINGUAMQ_PASSWORD"


class Login(TypedDict):
    """How a client logs in: keyword arguments of ``MqttClient`` and ``linguamq.Client``."""

    username: str | None
    password: str | None
    cafile: str | None


def add_connection_arguments(parser: argparse._ActionsContainer) -> None:  # a parser or an argument group
    """--username/-u, --password/-P and --cafile: how a command logs in to a secured broker
    (`linguamq hub --users`, or mosquitto with an exported password_file)."""
    parser.add_argument("-u", "--username", metavar="NAME", help="user name on the broker (see `linguamq users`)")
    parser.add_argument("-P", "--password", metavar="PASS",
                        help=f"its password (default: ${PASSWORD_ENV}, which `ps` does not show)")
    parser.add_argument("--cafile", metavar="FILE",
                        help="CA certificate that signed the broker's (for mqtts:// URLs; `linguamq tls init`)")


def connection_kwargs(args: argparse.Namespace) -> Login:
    """``MqttClient`` keyword arguments (username, password, cafile) from those options.

    A username without a password takes $LINGUAMQ_PASSWORD; ValueError if there is none."""
    username = getattr(args, "username", None)
    password = getattr(args, "password", None)
    if username is not None and password is None:
        password = os.environ.get(PASSWORD_ENV)
        if not password:
            raise ValueError(f"--username {username} needs a password: --password or ${PASSWORD_ENV}")
    if password is not None and username is None:
        raise ValueError("--password needs --username")
    return Login(username=username, password=password, cafile=getattr(args, "cafile", None))
