"""The embedded broker in a child process of its own.

The hub's head, planner and blob server are Python threads; sharing one GIL with the
broker's event loop cost ~1 ms per hop and several ms of head turnaround per token
(measured with `linguamq trace`). In its own process the broker runs beside them.

The child prints its URL on stdout and runs until its stdin closes: when the parent
stops it, or dies, the child follows (no orphan broker holding the port).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator

from linguamq.broker.errors import BrokerStartError

START_TIMEOUT_S = 30.0


class BrokerProcess:
    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        self.url = ""
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> BrokerProcess:
        self._proc = subprocess.Popen([sys.executable, "-m", "linguamq.tools.broker_process", self.host,
                                       str(self.port)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self._first_line()
        if not line.startswith("mqtt://"):
            self.stop()
            raise BrokerStartError(f"the broker process did not start on {self.host}:{self.port}: {line or 'no output'}")
        self.url = line
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        with contextlib.suppress(OSError):
            proc.stdin.close()  # the child's cue to stop
        try:
            proc.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=START_TIMEOUT_S)
        proc.stdout.close()

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _first_line(self) -> str:
        with selectors.DefaultSelector() as sel:
            sel.register(self._proc.stdout, selectors.EVENT_READ)
            if not sel.select(START_TIMEOUT_S):
                return ""
        return self._proc.stdout.readline().strip()


@contextlib.contextmanager
def embedded_broker(where: str = "process", host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """The embedded broker in a child process or in a thread of this one; yields its URL."""
    if where == "thread":
        from linguamq.broker.embedded import BrokerThread, EmbeddedBroker
        with BrokerThread(broker=EmbeddedBroker(host=host, port=port)) as running:
            yield running.url
        return
    with BrokerProcess(host=host, port=port) as running:
        yield running.url


def main(argv: list[str]) -> int:
    from linguamq.broker.embedded import BrokerThread, EmbeddedBroker
    from linguamq.broker.errors import BrokerError
    from linguamq.tools import logs

    logs.configure(level="warning")  # stdout carries the URL; logs go to stderr
    host, port = argv[0], int(argv[1])
    try:
        with BrokerThread(broker=EmbeddedBroker(host=host, port=port)) as running:
            print(running.url, flush=True)
            sys.stdin.read()  # until the parent closes it (or dies)
    except BrokerError as exc:
        print(f"error: {exc}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
