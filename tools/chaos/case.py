"""Reliability and security cases: one definition, run by the tests and by `linguamq bench chaos`.

A case injects something (a kill, a frozen node, a hub restart, hostile payloads, an
intruder) into a real local cluster or broker and reports what it observed as an
``Outcome``: a row of RELIABILITY.md. What it observed is a typed record of counts (one
dataclass per case): the tests assert on those fields themselves, the table's `observed`
cell is rendered from them and its `ok` cell is the case's own verdict on them.
`linguamq bench chaos` runs every case at full size and writes the table.

Cases live in three modules, by what they exercise: ``faults`` (nodes and the hub
dying or freezing, duplicated deliveries), ``inputs`` (hostile payloads, limits,
soak) and ``security`` (users, ACLs, TLS). Each exposes ``CASES``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, Generic, Protocol, TypeVar


@dataclasses.dataclass(frozen=True, kw_only=True)
class ChaosContext:
    artifacts: Path  # an exported model directory (`linguamq export`, or a tiny one)
    workdir: Path  # scratch space for node caches, logs, users files, certificates
    full: bool = False  # False: the counts the tests use; True: the full counts
    log: Callable[[str], None] = lambda line: None  # progress lines for long cases


class Counts(Protocol):
    """What a case observed, counted (a frozen dataclass per case)."""

    __dataclass_fields__: ClassVar[dict[str, Any]]

    @property
    def ok(self) -> bool:
        """The case's claim holds (the table's verdict; tests assert on the fields)."""
        ...

    def observed(self) -> str:
        """The fields in words: what a user would see."""
        ...


C = TypeVar("C", bound=Counts, covariant=True)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Outcome(Generic[C]):
    case: str  # short name, e.g. "node kill -9"
    injected: str  # what was done, with counts: "kill -9 of n2 during 20 concurrent requests"
    counts: C  # what was observed: "20/20 token-identical to run-local" is requests=20, identical=20
    figure: str  # the number that matters: "next token 1.6 s after the kill"
    problems: tuple[str, ...] = ()  # what went wrong, in the failures' own words (shown when not ok)

    @property
    def ok(self) -> bool:
        return self.counts.ok

    @property
    def observed(self) -> str:
        text = self.counts.observed()
        if self.ok or not self.problems:
            return text
        return f"{text}; {'; '.join(self.problems)}"[:600]

    def row(self) -> str:
        cells = (self.case, self.injected, self.observed, self.figure, "yes" if self.ok else "**no**")
        return "| " + " | ".join(c.replace("|", "/") for c in cells) + " |"

    def as_json(self) -> dict[str, Any]:
        return {"case": self.case, "injected": self.injected, "observed": self.observed, "figure": self.figure,
                "ok": self.ok, "counts": dataclasses.asdict(self.counts), "problems": list(self.problems)}


@dataclasses.dataclass(frozen=True)
class Crashed:
    """A case that raised instead of finishing."""

    error: str

    @property
    def ok(self) -> bool:
        return False

    def observed(self) -> str:
        return self.error


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    run: Callable[[ChaosContext], Outcome[Counts]]
    slow: bool = False  # only in `linguamq bench chaos` (soak, 10,000-message fuzz)


TABLE_HEADER = ("| case | injected | observed | figure | ok |\n"
                "|---|---|---|---|---|")
