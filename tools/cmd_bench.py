"""`linguamq bench NAME`: one benchmark per module `linguamq.tools.bench_<name>`.

Each benchmark module exposes ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> int``; every one takes ``--json``. Results go to BENCHMARKS.md by hand,
with the command that produced them.
"""

from __future__ import annotations

import argparse
import importlib

NAME = "bench"
HELP = "measure speed: " + ", ".join(BENCHES := ("codec", "local", "pipeline", "transport"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", metavar="BENCH", required=True)
    for name in BENCHES:
        module = importlib.import_module(f"linguamq.tools.bench_{name}")
        b = sub.add_parser(module.NAME, help=module.HELP, description=module.HELP)
        b.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        module.add_arguments(b)
        b.set_defaults(_bench=module.run)


def run(args: argparse.Namespace) -> int:
    return args._bench(args)
