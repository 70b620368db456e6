"""A real mosquitto on a free 127.0.0.1 port, for the benches and chaos cases that compare with it."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

WAIT = 10.0  # seconds for mosquitto to listen, and to stop


class MosquittoError(RuntimeError):
    """mosquitto is missing or did not start."""


def mosquitto_binary(binary: str | None = None) -> str:
    path = binary or shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    if not Path(path).exists():
        raise MosquittoError(f"mosquitto not found ({path}): install it (`make setup`)")
    return path


@contextlib.contextmanager
def mosquitto(conf_lines: str = "allow_anonymous true\n", *, root: Path | None = None,
              binary: str | None = None) -> Iterator[int]:
    """Run mosquitto with ``conf_lines`` (plus a 127.0.0.1 listener) and yield its port.

    The config and log are written to ``root`` (a temporary directory if None); the
    process is stopped by its pid."""
    path = mosquitto_binary(binary)
    with contextlib.ExitStack() as stack:
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="linguamq-mosquitto-")))
        # As root, mosquitto drops to user `mosquitto`, which cannot read 0600 password files.
        as_root = "user root\n" if os.geteuid() == 0 else ""
        conf, log = root / "mosquitto.conf", root / "mosquitto.log"
        for _ in range(3):  # the free port may be taken between the probe and mosquitto's bind
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            # set_tcp_nodelay: without it mosquitto can hold a small message until the previous one
            # is acknowledged (`bench pipeline`: 56 vs 26 ms/token); our clients and broker never Nagle.
            conf.write_text(f"listener {port} 127.0.0.1\nset_tcp_nodelay true\n{conf_lines}{as_root}persistence false\n")
            with log.open("wb") as log_file:
                proc = subprocess.Popen([path, "-c", str(conf)], stdout=log_file, stderr=log_file)
            try:
                if _listening(proc, port):
                    yield port
                    return
            finally:
                _stop(proc)
        raise MosquittoError(f"mosquitto did not listen: {log.read_text()[-2000:]}")


def _listening(proc: subprocess.Popen[bytes], port: int) -> bool:
    deadline = time.monotonic() + WAIT
    while proc.poll() is None and time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return True
        except OSError:
            time.sleep(0.02)
    return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=WAIT)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=WAIT)
