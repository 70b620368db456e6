"""Real brokers on 127.0.0.1 port 0 and real paho-mqtt clients, all waits bounded.

pytest runs with --import-mode=importlib, so test modules cannot import from here: they get
what they need through fixtures (``peer``, ``custom_broker``, ``raw_mqtt``; ``any_broker`` and
``any_peer`` for behaviour the embedded broker shares with mosquitto) and compare received
messages with plain tuples (``Msg`` is a NamedTuple).
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple, Protocol

import paho.mqtt.client as mqtt
import pytest

from linguamq.broker import BrokerThread, EmbeddedBroker
from linguamq.tools.testing.mosquitto import mosquitto

WAIT = 5.0  # seconds: every wait in these tests is bounded by this
PROBE = "probe"  # root of the topics Peer.sync() uses


class Msg(NamedTuple):
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Peer:
    """A paho client whose messages land in a queue, with TCP_NODELAY like our nodes."""

    _serial = itertools.count()

    def __init__(self, port: int, client_id: str, *, keepalive: int = 30) -> None:
        self.client_id = client_id
        self._port, self._keepalive = port, keepalive
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                                  protocol=mqtt.MQTTv311)
        self.inbox: queue.Queue[Msg] = queue.Queue()
        self.connack: queue.Queue[mqtt.ReasonCode] = queue.Queue()
        self.disconnected = threading.Event()
        self._subacks: dict[int, queue.Queue[list[int]]] = {}
        self._lock = threading.Lock()
        self.client.on_socket_open = lambda c, u, sock: sock.setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.on_connect = lambda c, u, flags, rc, props: self.connack.put(rc)
        self.client.on_disconnect = lambda c, u, flags, rc, props: self.disconnected.set()
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = lambda c, u, m: self.inbox.put(
            Msg(m.topic, bytes(m.payload), m.qos, bool(m.retain)))

    def _suback_queue(self, mid: int) -> queue.Queue[list[int]]:
        with self._lock:
            return self._subacks.setdefault(mid, queue.Queue())

    def _on_subscribe(self, client: mqtt.Client, userdata: object, mid: int,
                      codes: list[mqtt.ReasonCode], props: object) -> None:
        self._suback_queue(mid).put([c.value for c in codes])

    def connect(self, *, expect_success: bool = True) -> int:
        """Connect and wait for CONNACK; returns its return code (0 = accepted)."""
        self.client.reconnect_delay_set(min_delay=30, max_delay=60)  # no retry storms in tests
        self.client.connect("127.0.0.1", self._port, keepalive=self._keepalive)
        self.client.loop_start()
        code = self.connack.get(timeout=WAIT)
        if expect_success:
            assert not code.is_failure, f"{self.client_id}: CONNACK {code}"
        return code.value

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def subscribe(self, *filters: str | tuple[str, int]) -> list[int]:
        """One SUBSCRIBE with all ``filters`` (QoS 0 unless given); waits for its SUBACK."""
        pairs = [(f, 0) if isinstance(f, str) else f for f in filters]
        rc, mid = self.client.subscribe(pairs)
        assert rc == mqtt.MQTT_ERR_SUCCESS
        return self._suback_queue(mid).get(timeout=WAIT)

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        info.wait_for_publish(timeout=WAIT)
        assert info.is_published(), f"{self.client_id}: publish to {topic} not acknowledged"

    def receive(self, timeout: float = WAIT) -> Msg:
        return self.inbox.get(timeout=timeout)

    def sync(self) -> list[Msg]:
        """Everything received so far, provably complete, probe messages left out.

        Subscribes to a fresh probe topic, then publishes to it and waits for that message.
        Both brokers handle a client's packets in order, start a SUBSCRIBE's retained
        deliveries right after its SUBACK and send what they forward to a client in the order
        they started it; the probe goes out only once its own SUBACK is in, so whatever the
        broker was going to send for earlier CONNECT/SUBSCRIBE/PUBLISHes arrives before it.
        """
        probe = f"{PROBE}/{self.client_id}/{next(self._serial)}"
        self.subscribe(probe)
        self.client.publish(probe, b"probe", qos=0)
        received = []
        while True:
            msg = self.inbox.get(timeout=WAIT)
            if msg.topic == probe:
                return received
            if not msg.topic.startswith(f"{PROBE}/"):
                received.append(msg)


class Listening(Protocol):
    @property
    def port(self) -> int: ...


def peers_of(broker: Listening) -> Iterator[Callable[..., Peer]]:
    made: list[Peer] = []

    def make(client_id: str, *, connect: bool = True, keepalive: int = 30) -> Peer:
        peer = Peer(broker.port, client_id, keepalive=keepalive)
        made.append(peer)
        if connect:
            peer.connect()
        return peer

    yield make
    for peer in made:
        peer.close()


# --- a raw MQTT 3.1.1 client, for what paho will not do (go silent, hold a socket) ---------

def _string(data: bytes) -> bytes:
    return len(data).to_bytes(2, "big") + data


def _remaining_length(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id: str, *, keepalive: int,
                   will: tuple[str, bytes, int, bool] | None = None) -> bytes:
    flags, payload = 0x02, _string(client_id.encode())  # clean session
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += _string(topic.encode()) + _string(message)
    body = _string(b"MQTT") + bytes([4, flags]) + keepalive.to_bytes(2, "big") + payload
    return bytes([0x10]) + _remaining_length(len(body)) + body


def raw_connect(port: int, client_id: str, *, keepalive: int,
                will: tuple[str, bytes, int, bool] | None = None) -> socket.socket:
    """A connected socket that sent CONNECT and got CONNACK 0, then does nothing at all."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT)
    try:
        sock.sendall(connect_packet(client_id, keepalive=keepalive, will=will))
        connack = b""
        while len(connack) < 4:
            chunk = sock.recv(4 - len(connack))
            assert chunk, "broker closed the socket instead of answering CONNECT"
            connack += chunk
        assert connack == b"\x20\x02\x00\x00", connack
    except BaseException:
        sock.close()
        raise
    return sock


def closed_by_peer(sock: socket.socket, timeout: float = WAIT) -> bool:
    """True once the other end closes (EOF or reset); False if it is still open at timeout."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


# --- mosquitto, the reference broker ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunningBroker:
    """A broker a test talks to: ``kind`` is "embedded" or "mosquitto"."""

    kind: str
    port: int


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture
def broker() -> Iterator[BrokerThread]:
    with BrokerThread() as running:
        yield running


@pytest.fixture
def peer(broker: BrokerThread) -> Iterator[Callable[..., Peer]]:
    """``peer("n1")``: a connected Peer on the ``broker`` fixture, closed after the test."""
    yield from peers_of(broker)


@pytest.fixture(params=["embedded", "mosquitto"])
def any_broker(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RunningBroker]:
    """Each test that uses it runs twice: on the embedded broker and on a fresh mosquitto."""
    if request.param == "embedded":
        with BrokerThread() as running:
            yield RunningBroker("embedded", running.port)
    else:
        with mosquitto(root=tmp_path) as port:
            yield RunningBroker("mosquitto", port)


@pytest.fixture
def any_peer(any_broker: RunningBroker) -> Iterator[Callable[..., Peer]]:
    """``any_peer("n1")``: a connected Peer on ``any_broker``, closed after the test."""
    yield from peers_of(any_broker)


@pytest.fixture
def custom_broker() -> Iterator[Callable[..., tuple[BrokerThread, Callable[..., Peer]]]]:
    """``custom_broker(max_payload=..., may_read=...)`` -> (running broker, peer factory)."""
    stack: list[tuple[BrokerThread, Iterator[Callable[..., Peer]]]] = []

    def make(**settings: object) -> tuple[BrokerThread, Callable[..., Peer]]:
        running = BrokerThread(broker=EmbeddedBroker(**settings))  # type: ignore[arg-type]
        running.start()
        factory = peers_of(running)
        stack.append((running, factory))
        return running, next(factory)

    yield make
    for running, factory in reversed(stack):
        next(factory, None)  # closes that broker's peers
        running.stop()


@pytest.fixture
def raw_mqtt() -> SimpleNamespace:
    """Helpers for a hand-made MQTT client: ``connect(port, id, keepalive=, will=)``,
    ``closed_by_peer(sock)``."""
    return SimpleNamespace(connect=raw_connect, closed_by_peer=closed_by_peer, wait=WAIT)
