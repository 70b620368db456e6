"""Connecting: a client pointed at a port where nothing listens is told so at once (it
used to wait its whole 10 s connect timeout); nodes still wait for a broker that comes up
after them."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from linguamq.broker import BrokerThread
from linguamq.broker.embedded import EmbeddedBroker
from linguamq.tools.cli import main
from linguamq.topics.client import MqttClient

pytestmark = pytest.mark.integration


def closed_port() -> int:
    """A 127.0.0.1 port with nothing listening on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_generate_against_a_port_where_nothing_listens_fails_at_once(capsys: pytest.CaptureFixture[str]) -> None:
    port = closed_port()
    t0 = time.monotonic()
    code = main(["generate", "--broker", f"mqtt://127.0.0.1:{port}", "--prompt", "hello"])
    elapsed = time.monotonic() - t0
    err = capsys.readouterr().err
    assert code == 2
    assert f"cannot connect to 127.0.0.1:{port}: connection refused (is the hub running?)" in err
    assert elapsed < 5.0  # generous: what was slow was the 10 s connect timeout


def test_a_node_started_before_its_broker_waits_for_it() -> None:
    port = closed_port()
    client = MqttClient(url=f"mqtt://127.0.0.1:{port}", client_id="early-node")
    started: list[MqttClient] = []
    connecting = threading.Thread(target=lambda: started.append(client.start(timeout=20)), daemon=True)
    connecting.start()
    with BrokerThread(broker=EmbeddedBroker(port=port)):
        connecting.join(25)
        try:
            assert started and client.connected
        finally:
            client.stop()
