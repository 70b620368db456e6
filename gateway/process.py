"""The gateway in a child process of its own (`hub --http`).

In the hub's process the gateway's per-token work (an MQTT delivery, a thread hand-off, an
SSE write) shares one GIL with the head, which is on every token's critical path: measured
with `linguamq bench api`, a streamed answer through the API took 1.05x the time of the same
answer through `linguamq generate`; with the gateway in a process of its own, 0.99x.

As the broker's child (broker/process.py): it prints one JSON line (its URL) and runs until
its stdin closes, so it never outlives the hub; the hub's password reaches it in the
environment, never in argv.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import selectors
import signal
import subprocess
import sys

from linguamq.gateway.settings import GatewaySettings

PASSWORD_ENV = "LINGUAMQ_GATEWAY_PASSWORD"
START_TIMEOUT_S = 30.0


class GatewayProcess:
    def __init__(self, settings: GatewaySettings, *, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.settings, self.host, self.port = settings, host, port
        self.url = ""
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> GatewayProcess:
        s = self.settings
        env = {k: v for k, v in os.environ.items() if k != PASSWORD_ENV}
        if s.password is not None:
            env[PASSWORD_ENV] = s.password
        argv = [s.broker_url, s.cluster, self.host, str(self.port), "--timeout", str(s.timeout)]
        argv += ["--username", s.username] if s.username else []
        argv += ["--cafile", s.cafile] if s.cafile else []
        self._proc = proc = subprocess.Popen([sys.executable, "-m", "linguamq.gateway.process", *argv], env=env,
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = _first_line(proc)
        try:
            self.url = json.loads(line)["url"]
        except (ValueError, KeyError, TypeError):
            self.stop()
            raise OSError(f"the HTTP gateway did not start on {self.host}:{self.port}: {line or 'no output'}") from None
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        assert proc.stdin is not None and proc.stdout is not None  # started with both pipes
        with contextlib.suppress(OSError):
            proc.stdin.close()  # the child's cue to stop
        try:
            proc.wait(timeout=START_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=START_TIMEOUT_S)
        proc.stdout.close()


def _first_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None  # started with stdout=PIPE
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        if not sel.select(START_TIMEOUT_S):
            return ""
    return proc.stdout.readline().strip()


def main(argv: list[str]) -> int:
    import logging

    import structlog

    from linguamq.gateway.app import GatewayServer  # the web stack: in the child only
    from linguamq.topics.client import MqttError

    # An entry point of its own: stdout carries the URL, so logs go to stderr (the hub's).
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
                        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(prog="linguamq.gateway.process")
    for name in ("broker_url", "cluster", "host"):
        parser.add_argument(name)
    parser.add_argument("port", type=int)
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--username")
    parser.add_argument("--cafile")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C on the hub reaches us too: the hub stops us (stdin)
    settings = GatewaySettings(broker_url=args.broker_url, cluster=args.cluster, username=args.username,
                               password=os.environ.pop(PASSWORD_ENV, None), cafile=args.cafile, timeout=args.timeout)
    try:
        with GatewayServer(settings, host=args.host, port=args.port) as server:
            print(json.dumps({"url": server.url}), flush=True)
            sys.stdin.read()  # until the parent closes it (or dies)
    except (OSError, MqttError) as exc:
        print(f"error: {exc}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
