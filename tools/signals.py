"""Process set-up for daemons: GIL switching, and running until SIGINT/SIGTERM."""

from __future__ import annotations

import signal
import sys
import threading

# The hub runs the broker, the head and the planner as threads of one process, and a node
# its MQTT thread beside its worker. With CPython's default 5 ms switch interval a thread
# woken by a message waits up to 5 ms for the GIL while another computes: measured as
# ~4.5 ms of head turnaround per token. 0.5 ms bounds that wait; the cost is more switches.
SWITCH_INTERVAL_S = 0.0005


def tune_for_latency() -> None:
    sys.setswitchinterval(SWITCH_INTERVAL_S)


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
