"""`linguamq bench NAME`: one benchmark per module `linguamq.tools.bench.<name>`.

Each benchmark module exposes ``add_arguments(parser)`` and ``run(args) -> int``; every
one takes ``--json``. Only the chosen benchmark's module is imported. Results go to
BENCHMARKS.md with the command that produced them.
"""

from __future__ import annotations

import argparse
import importlib

BENCHES: dict[str, str] = {
    "codec": "activation envelope encode/decode throughput (4 KiB and 4 MiB float32)",
    "local": "run-local fp32/int8/int4 vs transformers vs llama.cpp: TTFT, decode, prefill, peak RSS (SmolLM2, ~100M)",
    "transport": "one MQTT hop of an activation envelope (8 KiB, 1 MiB): embedded broker vs mosquitto",
    "pipeline": "decode ms/token of local node processes vs run-local (~100M model)",
    "batch": "a decode step of 1, 2, 4, 8 sessions as one call: ms and ratio to one step (SmolLM2 int4, ~100M)",
    "planner": "placement MILP solve time: 34 pieces x 8 devices, 130 x 16 (both objectives)",
    "hetero": "4 emulated devices (~100M model): planned vs even split, pipelining, rebalancing, prediction",
    "failover": "kill -9 of a middle stage node: time to the interrupted request's next token (~100M model)",
    "api": "streamed chat completion through the OpenAI API vs linguamq generate, alternating (SmolLM2)",
    "quality": "greedy agreement of int8 and int4 exports with fp32, and their sizes (3 families, SmolLM2)",
    "chaos": "every reliability/security case (faults, hostile input, limits, soak, ACLs): RELIABILITY.md",
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "benchmarks:\n" + "\n".join(f"  {name:10} {help_}" for name, help_ in BENCHES.items())
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("bench", choices=BENCHES, metavar="BENCH", help=f"one of: {', '.join(BENCHES)}")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's options (BENCH --help)")


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"linguamq.tools.bench.{args.bench}")
    parser = argparse.ArgumentParser(prog=f"linguamq bench {args.bench}", description=BENCHES[args.bench])
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    module.add_arguments(parser)
    return module.run(parser.parse_args(args.options))
