"""Real brokers on 127.0.0.1 port 0 and real paho-mqtt clients, all waits bounded.

pytest runs with --import-mode=importlib, so test modules cannot import from here: they get
what they need through fixtures (``peer``, ``custom_broker``, ``raw_mqtt``; ``any_broker`` and
``any_peer`` for behaviour the embedded broker shares with mosquitto) and compare received
messages with plain tuples (``Msg`` is a NamedTuple).
"""

from __future__ import annotations

import contextlib
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
                   will: tuple[str, bytes, int, bool] | None = None, clean: bool = True) -> bytes:
    flags, payload = (0x02 if clean else 0), _string(client_id.encode())
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


class Packet(NamedTuple):
    """One MQTT packet as read off the wire: type (high nibble), flags (low nibble), body."""

    kind: int
    flags: int
    body: bytes

    @property
    def packet_id(self) -> int:  # PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK
        return int.from_bytes(self.body[:2], "big")


class Published(NamedTuple):
    """A PUBLISH a RawClient received."""

    topic: str
    payload: bytes
    qos: int
    packet_id: int | None
    dup: bool
    retain: bool


CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP, SUBACK = 2, 3, 4, 5, 6, 7, 9


class RawClient:
    """An MQTT 3.1.1 client written by hand: it acknowledges only when told to, can drop
    its socket without DISCONNECT, resend a packet id, and shows every flag on the wire."""

    def __init__(self, port: int, client_id: str, *, clean: bool = True, keepalive: int = 60,
                 will: tuple[str, bytes, int, bool] | None = None) -> None:
        self.port, self.client_id, self.clean, self.keepalive = port, client_id, clean, keepalive
        self.will = will
        self.sock: socket.socket | None = None
        self._buffer = b""
        self._ids = itertools.count(1)

    def connect(self, *, clean: bool | None = None) -> bool:
        """CONNECT and wait for CONNACK 0; returns its session-present flag."""
        clean = self.clean if clean is None else clean
        self.drop()
        self.sock, self._buffer = socket.create_connection(("127.0.0.1", self.port), timeout=WAIT), b""
        self.sock.sendall(connect_packet(self.client_id, keepalive=self.keepalive, clean=clean, will=self.will))
        connack = self.read()
        assert connack is not None and connack.kind == CONNACK, connack
        assert connack.body[1] == 0, f"CONNACK return code {connack.body[1]}"
        return bool(connack.body[0] & 1)

    def drop(self) -> None:
        """Close the socket without DISCONNECT (the broker sees a lost connection)."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def disconnect(self) -> None:
        """DISCONNECT, then wait until the broker closed the connection: what is published
        after this returns finds the client away."""
        if self.sock is not None:
            self.sock.sendall(b"\xe0\x00")
            assert closed_by_peer(self.sock), "the broker kept the connection after DISCONNECT"
            self.drop()

    def send(self, kind: int, flags: int, body: bytes) -> None:
        assert self.sock is not None, "not connected"
        self.sock.sendall(bytes([kind << 4 | flags]) + _remaining_length(len(body)) + body)

    def ack(self, kind: int, packet_id: int) -> None:
        """PUBACK, PUBREC, PUBREL (flags 2) or PUBCOMP for ``packet_id``."""
        self.send(kind, 2 if kind == PUBREL else 0, packet_id.to_bytes(2, "big"))

    def publish(self, topic: str, payload: bytes, *, qos: int, packet_id: int | None = None,
                dup: bool = False, retain: bool = False) -> int | None:
        """Send a PUBLISH (no wait for its acknowledgement); returns its packet id."""
        pid = (packet_id or next(self._ids)) if qos else None
        body = _string(topic.encode()) + (pid.to_bytes(2, "big") if pid else b"") + payload
        self.send(PUBLISH, (8 if dup else 0) | qos << 1 | (1 if retain else 0), body)
        return pid

    def subscribe(self, *filters: tuple[str, int]) -> list[int]:
        pid = next(self._ids)
        payload = b"".join(_string(f.encode()) + bytes([q]) for f, q in filters)
        self.send(8, 2, pid.to_bytes(2, "big") + payload)
        suback = self.expect(SUBACK)
        assert suback.packet_id == pid
        return list(suback.body[2:])

    def read(self, timeout: float = WAIT) -> Packet | None:
        """The next packet, or None once the broker closed the connection."""
        assert self.sock is not None, "not connected"
        self.sock.settimeout(timeout)
        while True:
            packet = self._parse()
            if packet is not None:
                return packet
            try:
                chunk = self.sock.recv(65536)
            except ConnectionError:
                return None
            if not chunk:
                return None
            self._buffer += chunk

    def quiet(self, timeout: float = 0.5) -> bool:
        """True if nothing arrives for ``timeout`` seconds (for what must NOT be sent)."""
        try:
            packet = self.read(timeout)
        except TimeoutError:
            return True
        raise AssertionError(f"unexpected packet {packet}")

    def expect(self, kind: int) -> Packet:
        packet = self.read()
        assert packet is not None, f"connection closed while waiting for packet type {kind}"
        assert packet.kind == kind, f"expected packet type {kind}, got {packet}"
        return packet

    def receive(self) -> Published:
        return parse_publish(self.expect(PUBLISH))

    def _parse(self) -> Packet | None:
        data = self._buffer
        length, shift, i = 0, 0, 1
        while True:
            if i >= len(data):
                return None
            length |= (data[i] & 0x7F) << shift
            shift, i = shift + 7, i + 1
            if not data[i - 1] & 0x80:
                break
        if len(data) < i + length:
            return None
        self._buffer = data[i + length:]
        return Packet(data[0] >> 4, data[0] & 0x0F, data[i:i + length])


def parse_publish(packet: Packet) -> Published:
    qos = (packet.flags >> 1) & 3
    n = int.from_bytes(packet.body[:2], "big")
    topic, rest = packet.body[2:2 + n].decode(), packet.body[2 + n:]
    pid = int.from_bytes(rest[:2], "big") if qos else None
    return Published(topic, rest[2:] if qos else rest, qos, pid, bool(packet.flags & 8), bool(packet.flags & 1))


# --- mosquitto, the reference broker ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RunningBroker:
    """A broker a test talks to: ``kind`` is "embedded" or "mosquitto"."""

    kind: str
    port: int
    thread: BrokerThread | None = None  # the embedded broker's
    log: Path | None = None  # mosquitto's log file


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
            yield RunningBroker("embedded", running.port, thread=running)
    else:
        with mosquitto(root=tmp_path) as port:
            yield RunningBroker("mosquitto", port, log=tmp_path / "mosquitto.log")


@pytest.fixture(params=["embedded", "mosquitto"])
def broker_with(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[..., RunningBroker]]:
    """``broker_with(max_queued_messages=3)``: a broker with settings both brokers have (under
    the same names in mosquitto.conf); each test that uses it runs on both."""
    with contextlib.ExitStack() as stack:
        def start(**settings: int) -> RunningBroker:
            if request.param == "embedded":
                running = stack.enter_context(BrokerThread(broker=EmbeddedBroker(**settings)))  # type: ignore[arg-type]
                return RunningBroker("embedded", running.port, thread=running)
            conf = "allow_anonymous true\n" + "".join(f"{key} {value}\n" for key, value in settings.items())
            port = stack.enter_context(mosquitto(conf, root=tmp_path))
            return RunningBroker("mosquitto", port, log=tmp_path / "mosquitto.log")
        yield start


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
def raw_mqtt() -> Iterator[SimpleNamespace]:
    """Helpers for a hand-made MQTT client: ``connect(port, id, keepalive=, will=)``,
    ``closed_by_peer(sock)``, ``Client(port, id, clean=)`` (a RawClient) and the packet types."""
    made: list[RawClient] = []

    def client(port: int, client_id: str, **kwargs: object) -> RawClient:
        made.append(RawClient(port, client_id, **kwargs))  # type: ignore[arg-type]
        return made[-1]

    yield SimpleNamespace(connect=raw_connect, closed_by_peer=closed_by_peer, wait=WAIT, Client=client,
                           CONNACK=CONNACK, PUBLISH=PUBLISH, PUBACK=PUBACK, PUBREC=PUBREC, PUBREL=PUBREL,
                           PUBCOMP=PUBCOMP, SUBACK=SUBACK, parse=parse_publish)
    for made_client in made:
        made_client.drop()
