"""Reliability and security cases: one definition, run by the tests and by `linguamq bench chaos`.

A case injects something (a kill, a frozen node, a hub restart, hostile payloads, an
intruder) into a real local cluster or broker and reports what it observed as an
``Outcome``: a row of RELIABILITY.md. The tests run the fast cases with small counts and
assert ``ok``; `linguamq bench chaos` runs every case at full size and writes the table.

Cases live in three modules, by what they exercise: ``faults`` (nodes and the hub
dying or freezing, duplicated deliveries), ``inputs`` (hostile payloads, limits,
soak) and ``security`` (users, ACLs, TLS). Each exposes ``CASES``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChaosContext:
    artifacts: Path  # an exported model directory (`linguamq export`, or a tiny one)
    workdir: Path  # scratch space for node caches, logs, users files, certificates
    full: bool = False  # False: the counts the tests use; True: the full counts
    log: Callable[[str], None] = lambda line: None  # progress lines for long cases


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outcome:
    case: str  # short name, e.g. "node kill -9"
    injected: str  # what was done, with counts: "kill -9 of n2 during 20 concurrent requests"
    observed: str  # what a user would see: "20/20 token-identical to run-local"
    figure: str  # the number that matters: "next token 1.6 s after the kill"
    ok: bool

    def row(self) -> str:
        cells = (self.case, self.injected, self.observed, self.figure, "yes" if self.ok else "**no**")
        return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[ChaosContext], Outcome]
    slow: bool = False  # only in `linguamq bench chaos` (soak, 10,000-message fuzz)


TABLE_HEADER = ("| case | injected | observed | figure | ok |\n"
                "|---|---|---|---|---|")
