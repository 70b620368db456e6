"""The `linguamq` command: one subcommand per module ``linguamq.tools.commands.<name>``.

Each command module exposes ``add_arguments(parser)`` and ``run(args) -> int``. Only the
chosen command's module is imported: a phone running `linguamq node` must never load
what `export` needs (torch). Only listed commands, which really work, appear in --help.
This is the composition root: logging is configured here, never at import time.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

import linguamq
from linguamq.tools import logs

# name -> one-line help, in --help order.
COMMANDS: dict[str, str] = {
    "tiny": "write a tiny deterministic random model (llama, qwen2, bloom) as a Hugging Face directory",
    "export": "export a model (Hugging Face directory, GGUF file, or smollm2) to per-piece ONNX files with a KV cache",
    "run-local": "generate text with every piece of an exported model in this process",
    "hub": "run the hub: MQTT broker, retained manifest, planner and head",
    "node": "run a node: fetch assigned pieces, run them, pass activations on",
    "generate": "generate text through a running cluster (same JSON keys as run-local)",
    "chat": "chat with a running cluster's model in the terminal (keeps the conversation; needs a chat template)",
    "serve": "serve the OpenAI API (/v1/chat/completions ...) and a live dashboard of a running cluster",
    "plan": "place a model on a set of devices offline (Pyomo/GLPK) and explain the plan",
    "demo": "chat with SmolLM2 split across a hub and three local nodes, compare with run-local",
    "pub": "publish one message (or one per line): mosquitto_pub's flags (-h is the host; --help)",
    "sub": "subscribe and print messages: mosquitto_sub's flags (-h is the host; --help); --decode renders ours",
    "users": "manage a cluster's users file: add, remove, list, export-mosquitto (password_file, acl_file)",
    "tls": "make a CA and a server certificate for a home cluster's TLS listener (tls init DIR)",
    "trace": "watch requests cross the pipeline (per hop and node), record them, export Perfetto/PNG",
    "bench": "measure speed (see `linguamq bench --help`)",
}


def module_name(command: str) -> str:
    return f"linguamq.tools.commands.{command.replace('-', '_')}"


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linguamq",
        description="Run one large language model across several small devices over MQTT.",
    )
    parser.add_argument("--version", action="version", version=f"linguamq {linguamq.__version__}")
    logs.add_arguments(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    chosen = next((word for word in argv if word in COMMANDS), None)  # global options take no command names
    for name, help_ in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            module = importlib.import_module(module_name(name))
            logs.add_arguments(cmd, suppress_defaults=True)
            module.add_arguments(cmd)
            cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    logs.configure(fmt=args.log_format, level=args.log_level)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
