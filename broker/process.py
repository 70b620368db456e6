"""The embedded broker in a child process of its own.

The hub's head, planner and blob server are Python threads; sharing one GIL with the
broker's event loop cost ~1 ms per hop and several ms of head turnaround per token
(measured with `linguamq trace`). In its own process the broker runs beside them.

The child prints one JSON line (its URLs) on stdout and runs until its stdin closes: when
the parent stops it, or dies, the child follows (no orphan broker holding the port).
A secured broker (``BrokerOptions.users``) reads the users file itself; the hub's own
credential (a secret made for this run) reaches it in the environment, never in argv,
which any local user can read with `ps`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import selectors
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from linguamq.broker.errors import BrokerStartError
from linguamq.broker.users import HUB_SECRET_ENV

START_TIMEOUT_S = 30.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class BrokerOptions:
    """What secures an embedded broker (a users file, a TLS listener) and bounds what it keeps
    for each client (None: ``EmbeddedBroker``'s defaults)."""

    users: Path | None = None  # users file: authentication and ACLs (None: open broker)
    hub_secret: str | None = None  # password of the hub's own clients (users.HUB_USERNAME)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_port: int = 8883  # 0: any free port
    tls_only: bool = False
    max_inflight_messages: int | None = None  # QoS 1/2 messages a client has unacknowledged
    max_queued_messages: int | None = None  # more waiting behind those, or while it is away
    max_queued_bytes: int | None = None  # the same in bytes (0: no limit)
    session_expiry_s: float | None = None  # a persistent session whose client stays away this long ends

    def argv(self) -> list[str]:
        out = ["--users", str(self.users)] if self.users else []
        if self.tls_cert:
            out += ["--tls-cert", str(self.tls_cert), "--tls-key", str(self.tls_key), "--tls-port", str(self.tls_port)]
            out += ["--tls-only"] if self.tls_only else []
        for flag, value in self._limits().items():
            out += [f"--{flag.replace('_', '-')}", str(value)]
        return out

    def _limits(self) -> dict[str, int | float]:
        limits = {"max_inflight_messages": self.max_inflight_messages,
                  "max_queued_messages": self.max_queued_messages, "max_queued_bytes": self.max_queued_bytes,
                  "session_expiry_s": self.session_expiry_s}
        return {name: value for name, value in limits.items() if value is not None}


def broker_kwargs(options: BrokerOptions) -> dict[str, Any]:
    """``EmbeddedBroker`` keyword arguments for ``options`` (imports amqtt: hub side only)."""
    from linguamq.broker.acl import secured
    from linguamq.broker.embedded import TlsListener
    from linguamq.broker.users import Credentials
    kwargs: dict[str, Any] = {}
    if options.users is not None:
        kwargs.update(secured(Credentials.from_file(options.users, hub_secret=options.hub_secret)))
    if options.tls_cert is not None:
        kwargs["tls"] = TlsListener(cert=str(options.tls_cert), key=str(options.tls_key), port=options.tls_port,
                                    only=options.tls_only)
    kwargs.update(options._limits())
    return kwargs


class BrokerProcess:
    def __init__(self, *, host: str = "127.0.0.1", port: int = 0, options: BrokerOptions | None = None) -> None:
        self.host, self.port = host, port
        self.options = options or BrokerOptions()
        self.url = ""
        self.tls_url: str | None = None
        self._proc: subprocess.Popen[str] | None = None

    def start(self) -> BrokerProcess:
        env = dict(os.environ)
        env.pop(HUB_SECRET_ENV, None)
        if self.options.hub_secret:
            env[HUB_SECRET_ENV] = self.options.hub_secret
        self._proc = proc = subprocess.Popen([sys.executable, "-m", "linguamq.broker.process", self.host,
                                              str(self.port), *self.options.argv()], env=env,
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self._first_line(proc)
        try:
            urls = json.loads(line)
        except ValueError:
            urls = None
        if not isinstance(urls, dict) or not str(urls.get("url", "")).startswith(("mqtt://", "mqtts://")):
            self.stop()
            raise BrokerStartError(f"the broker process did not start on {self.host}:{self.port}: {line or 'no output'}")
        self.url, self.tls_url = urls["url"], urls.get("tls_url")
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

    def __enter__(self) -> BrokerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _first_line(self, proc: subprocess.Popen[str]) -> str:
        stdout = proc.stdout
        assert stdout is not None  # started with stdout=PIPE
        with selectors.DefaultSelector() as sel:
            sel.register(stdout, selectors.EVENT_READ)
            if not sel.select(START_TIMEOUT_S):
                return ""
        return stdout.readline().strip()


@contextlib.contextmanager
def embedded_broker(where: str = "process", host: str = "127.0.0.1", port: int = 0,
                    options: BrokerOptions | None = None) -> Iterator[str]:
    """The embedded broker in a child process or in a thread of this one; yields its URL."""
    if where == "thread":
        from linguamq.broker.embedded import BrokerThread, EmbeddedBroker
        with BrokerThread(broker=EmbeddedBroker(host=host, port=port,
                                                **broker_kwargs(options or BrokerOptions()))) as running:
            yield running.url
        return
    with BrokerProcess(host=host, port=port, options=options) as running:
        yield running.url


def main(argv: list[str]) -> int:
    import logging

    import structlog

    from linguamq.broker.embedded import BrokerThread, EmbeddedBroker
    from linguamq.broker.errors import BrokerError
    from linguamq.broker.users import UsersError

    # This child is an entry point of its own: stdout carries the URLs, so logs go to stderr.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
                        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    parser = argparse.ArgumentParser(prog="linguamq.broker.process")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--users", type=Path)
    parser.add_argument("--tls-cert", type=Path)
    parser.add_argument("--tls-key", type=Path)
    parser.add_argument("--tls-port", type=int, default=8883)
    parser.add_argument("--tls-only", action="store_true")
    parser.add_argument("--max-inflight-messages", type=int)
    parser.add_argument("--max-queued-messages", type=int)
    parser.add_argument("--max-queued-bytes", type=int)
    parser.add_argument("--session-expiry-s", type=float)
    args = parser.parse_args(argv)
    options = BrokerOptions(users=args.users, hub_secret=os.environ.pop(HUB_SECRET_ENV, None) or None,
                            tls_cert=args.tls_cert, tls_key=args.tls_key, tls_port=args.tls_port,
                            tls_only=args.tls_only, max_inflight_messages=args.max_inflight_messages,
                            max_queued_messages=args.max_queued_messages, max_queued_bytes=args.max_queued_bytes,
                            session_expiry_s=args.session_expiry_s)
    try:
        broker = EmbeddedBroker(host=args.host, port=args.port, **broker_kwargs(options))
        with BrokerThread(broker=broker) as running:
            print(json.dumps({"url": running.url, "tls_url": running.tls_url}), flush=True)
            sys.stdin.read()  # until the parent closes it (or dies)
    except (BrokerError, UsersError) as exc:
        print(f"error: {exc}", flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
