"""`linguamq bench chaos`: every reliability and security case, written to RELIABILITY.md.

The cases live in tools/chaos/faults.py (node and hub faults), tools/chaos/inputs.py
(hostile input, limits, soak) and tools/chaos/security.py (users, ACLs, TLS); each lists
its ``CASES``. Here they run at full size (``--quick``: the tests' counts) against a tiny
exported model built once under --workdir (or --artifacts), and each Outcome becomes a row
of the table. A module that is missing is a line in the output, not a failure.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shlex
import sys
import time
import traceback
from pathlib import Path

from linguamq.tools.chaos.case import TABLE_HEADER, Case, ChaosContext, Counts, Crashed, Outcome

MODULES = ("faults", "inputs", "security")
INTRO = """# Reliability and security

What linguamq promises under faults, hostile input, limits and intruders, each claim a case
that injects it into a real local cluster (hub with the embedded broker, node processes) and
reports what a user would see. The tests run the same cases with small counts; this file
holds the full-size run. Tokens are compared with `linguamq run-local` (greedy).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--only", action="append", default=[], metavar="NAME",
                        help="run only the case of this name (repeatable; see --list)")
    parser.add_argument("--quick", action="store_true", help="the tests' small counts, slow cases skipped")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--out", type=Path, default=Path("RELIABILITY.md"), help="where to write the table")
    parser.add_argument("--artifacts", type=Path, help="an exported model directory (default: a tiny llama)")
    parser.add_argument("--workdir", type=Path, default=Path("out/bench"), help="model cache, logs, scratch")


def load_cases() -> list[Case]:
    return [case for name in MODULES for case in importlib.import_module(f"linguamq.tools.chaos.{name}").CASES]


def tiny_model(workdir: Path) -> Path:
    """A 3-layer tiny llama (the integration tests' size), exported once under ``workdir``."""
    root = workdir / "chaos-tiny-llama"
    if not (root / "art" / "manifest.json").exists():
        from linguamq.models.export import ExportOptions, export_model  # torch: only when building
        from linguamq.models.tiny import TinySpec, make_tiny
        print(f"building the model in {root} (once) ...", file=sys.stderr, flush=True)
        make_tiny(TinySpec(family="llama", layers=3, hidden=64, heads=4, vocab=512, seed=23), root / "hf")
        export_model(root / "hf", root / "art", ExportOptions(max_context=512))
    return root / "art"


def run(args: argparse.Namespace) -> int:
    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    cases = load_cases()
    if args.list:
        for case in cases:
            print(f"{case.name}{'  (slow)' if case.slow else ''}")
        return 0
    unknown = set(args.only) - {c.name for c in cases}
    if unknown:
        print(f"linguamq bench chaos: error: no case {sorted(unknown)}; cases: {[c.name for c in cases]}",
              file=sys.stderr)
        return 2
    chosen = [c for c in cases if (not args.only or c.name in args.only) and not (args.quick and c.slow)]
    art = args.artifacts or tiny_model(args.workdir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    outcomes: list[Outcome[Counts]] = []
    for case in chosen:
        workdir = args.workdir / "chaos-run" / stamp / case.name.replace(" ", "-")
        workdir.mkdir(parents=True, exist_ok=True)  # cases may make their scratch dirs inside it
        ctx = ChaosContext(artifacts=art, workdir=workdir, full=not args.quick, log=log)
        log(f"== {case.name} ...")
        t0 = time.monotonic()
        try:
            outcome = case.run(ctx)
        except Exception as exc:  # a case that crashes is a row that says so
            traceback.print_exc()
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            outcome = Outcome(case=case.name, injected="(the case did not finish)", counts=Crashed(error), figure="-")
        log(f"   {'ok' if outcome.ok else 'FAILED'} in {time.monotonic() - t0:.0f} s: {outcome.observed}")
        outcomes.append(outcome)
    command = shlex.join(["linguamq", "bench", "chaos", *(sys.argv[3:] if sys.argv[1:3] == ["bench", "chaos"] else [])])
    args.out.write_text(render(outcomes, command=command.strip(), quick=args.quick))
    if args.json:
        print(json.dumps([o.as_json() for o in outcomes], indent=2))
    else:
        print(TABLE_HEADER)
        print("\n".join(o.row() for o in outcomes))
        print(f"written to {args.out}")
    return 0 if all(o.ok for o in outcomes) else 1


def render(outcomes: list[Outcome[Counts]], *, command: str, quick: bool) -> str:
    machine = f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, " \
              f"Python {platform.python_version()}"
    size = "quick counts (the tests')" if quick else "full counts"
    return (f"{INTRO}\nCommand: `{command}` ({size})  \nMachine: {machine}  \n"
            f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC\n\n"
            f"{TABLE_HEADER}\n" + "\n".join(o.row() for o in outcomes) + "\n")
