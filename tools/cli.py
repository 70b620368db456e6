"""The `linguamq` command: one subcommand per module in `linguamq.tools.cmd_*`.

Each command module exposes ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``. Only modules listed in ``COMMANDS`` appear in ``--help``, so a
command shows up only once it really works. This is the composition root: logging is
configured here, never at import time in library code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from linguamq.tools import logs

# Order is the order shown in --help.
COMMANDS = (
    "tiny",
    "export",
    "run-local",
    "hub",
    "node",
    "generate",
    "demo",
    "bench",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linguamq",
        description="Run one large language model across several small devices over MQTT.",
    )
    logs.add_arguments(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        module = importlib.import_module(f"linguamq.tools.cmd_{name.replace('-', '_')}")
        cmd = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        logs.add_arguments(cmd, suppress_defaults=True)
        module.add_arguments(cmd)
        cmd.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.configure(fmt=args.log_format, level=args.log_level)
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
