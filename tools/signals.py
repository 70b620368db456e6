"""Run a daemon until SIGINT/SIGTERM, then stop it cleanly (its will must not fire)."""

from __future__ import annotations

import signal
import threading


def wait_for_signal() -> int:
    """Block until SIGINT or SIGTERM; return the signal number."""
    got: list[int] = []
    done = threading.Event()

    def handler(signum: int, frame: object) -> None:
        got.append(signum)
        done.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)
    while not done.wait(0.5):
        pass
    return got[0]
