"""structlog set-up for `linguamq` entry points (library code only calls get_logger)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TextIO, cast

import structlog

LEVELS = ("debug", "info", "warning", "error")


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is when a line is logged, not when logging was set up.

    A command run in-process (tests; pytest swaps and closes its capture streams) must not
    leave background threads writing to a closed file long after it returned."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def add_arguments(parser: argparse.ArgumentParser, *, suppress_defaults: bool = False) -> None:
    # Accept the flags both before and after the subcommand; the subcommand's copy
    # must not overwrite a value given before it, hence SUPPRESS there.
    default = (lambda v: argparse.SUPPRESS) if suppress_defaults else (lambda v: v)
    parser.add_argument("--log-format", choices=("console", "json"), default=default("console"),
                        help="log line format on stderr (default: console)")
    parser.add_argument("--log-level", choices=LEVELS, default=default("warning"),
                        help="least severe level logged (default: warning)")


def configure(*, fmt: str = "console", level: str = "warning") -> None:
    numeric = getattr(logging, level.upper())
    logging.basicConfig(level=numeric, stream=_CurrentStderr(), format="%(message)s")
    renderer = (structlog.processors.JSONRenderer() if fmt == "json"
                else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty()))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, _CurrentStderr())),  # it only writes, flushes
        cache_logger_on_first_use=False,
    )
