"""amqtt 0.12.1's ``Broker`` with the fixes and the tuning linguamq needs.

Every change is an override on ``FixedBroker``, which only ``EmbeddedBroker`` instantiates.
Nothing in amqtt is patched at import time: any other amqtt broker in the same process keeps
amqtt's own behaviour. Line numbers are those of amqtt 0.12.1 (pyproject pins amqtt < 0.13;
re-check each override against the new source when that pin moves).

Retained messages (``amqtt/broker.py``):

1. On every CONNECT, ``_handle_client_session`` (broker.py:599-602) loops over the filters of
   *every* client of the broker (``self._subscriptions``) and sends the newcomer each retained
   message that matches any of them -- before it has subscribed to anything, once per matching
   filter, and once more when it then subscribes. A node thus got the other nodes' retained
   assignments and its own several times. ``_publish_retained_messages_for_subscription`` is
   only called from there and from ``_handle_subscription``; here it does nothing and
   ``_handle_subscription`` sends retained messages itself. (A resumed persistent session gets
   no retained replay either: MQTT 3.1.1 sends retained messages when a subscription is made
   [MQTT-3.3.1-6], not on reconnect, and mosquitto does the same.)
2. Retained delivery skipped the read check that live messages get: live delivery asks
   ``_topic_filtering(..., Action.RECEIVE)`` (broker.py:1025), retained delivery
   (broker.py:1134-1158) asks nothing. Here both go through the same ``may_read`` policy.
3. One SUBSCRIBE with overlapping filters sent a retained message once per matching filter
   (broker.py:718-722), and a retained message published at QoS 0 went out at the
   subscription's QoS (``min(qos, retained.qos or qos)``, broker.py:1150). Here a SUBSCRIBE
   sends each matching retained message once, at min(highest QoS granted to a matching filter
   of that SUBSCRIBE, QoS it was published with) [MQTT-3.3.5-1]. Each later SUBSCRIBE sends
   the retained messages its own filters match once more, a re-subscription to the same filter
   included: [MQTT-3.3.1-6] and [MQTT-3.8.4-3] require it, and mosquitto does it.
4. Re-subscribing to a filter with another QoS kept the old one (broker.py:887-890) while the
   SUBACK granted the new one [MQTT-3.8.4-3]. ``add_subscription`` replaces it.

Connections:

5. Keep-alive was never enforced: when the reader's keep-alive timeout fires, the handler
   calls ``handle_read_timeout`` (mqtt/protocol/handler.py:537-539), a no-op in
   ``BrokerProtocolHandler`` (broker_handler.py:86). A phone that drops off the Wi-Fi without
   a FIN stayed "connected" forever and its will (status offline) never went out. Here a
   watchdog aborts the connection after 1.5 x keep-alive without a read [MQTT-3.1.2-24], and
   the will follows. amqtt's session is told keep-alive 0, so that its per-packet timeouts
   (a task and a timer around every read, handler.py:466; a write timer re-armed on every
   packet sent, handler.py:573-576, for a no-op callback) are not paid on every message.
6. A clean-session CONNECT with the client id of a connected client only forgot the old
   session (``_delete_session``, broker.py:912) and left its connection running
   [MQTT-3.1.4-2]; once 5. closes it, its will would land after (and overwrite) the status the
   reconnected node just published. ``_delete_session`` closes the old connection first and
   waits until its will is out, before the new client gets its CONNACK.
7. A will bypassed the publish check (``_handle_disconnect`` broadcasts it unchecked,
   broker.py:677-693). A CONNECT whose will topic ``may_publish`` denies is refused with
   CONNACK 5 (not authorized), as mosquitto 2 does.
8. No timeout on the CONNECT packet: a socket that connects and stays silent was kept forever.
   Here it is closed after ``connect_timeout``.

Tuning:

9. TCP_NODELAY on every accepted socket. asyncio's selector transport already sets it on TCP
   sockets (asyncio/selector_events.py, ``base_events._set_nodelay``), but only when the
   socket's ``proto`` is IPPROTO_TCP; setting it here keeps it on whatever the loop or socket.
10. ``max_payload``: amqtt accepts PUBLISH payloads up to MQTT's 256 MiB and reads each one
    whole into memory. The reader here refuses any read above the limit *before* reading it,
    which closes that client's connection.
11. amqtt formats the repr of every payload it broadcasts into a debug message, even with
    DEBUG off (broker.py:1013): ~12 ms per MiB, most of a 1 MiB hop. ``_broadcast_message``
    (12.) no longer goes through that code.
12. A PUBLISH took five trips through the event loop before its first byte went out: the
    handler's task puts it on the session's delivered_message_queue (handler.py:332), the
    client's message loop takes it (broker.py:606-644) and puts it on _broadcast_queue
    (broker.py:1114), a new _run_broadcast task takes it and starts one task per subscriber
    (broker.py:959-1061) -- and the publisher's PUBACK went out before all that. Here a
    QoS 0/1 PUBLISH is routed in the handler's task (amqtt's own checks, events, policy and
    retain, ``_handle_message_delivery``), the deliveries start, then the PUBACK follows.
    `linguamq bench transport` measures the hop: with 5., 12. and a leaner read (below), the
    embedded broker's 8 KiB hop went from ~2x mosquitto's median to ~1.3-1.6x (a busy
    2-vCPU VM). What is left is amqtt's own per-packet work: a few byte-sized reads, a task
    per packet, ~200 us of Python per QoS 1 hop (PUBLISH in and out, two PUBACKs).

Live delivery and subscriptions:

13. A client whose subscriptions overlap (a cluster's ``#`` and its ``plan`` topic) got a live
    message once per matching filter (broker.py:1015-1061). Here it gets it once, at the
    highest QoS of its matching subscriptions [MQTT-3.3.5-1], as from mosquitto.
14. SUBSCRIBE and UNSUBSCRIBE packets went on two queues that the client's message loop
    serves, SUBSCRIBE first when both are waiting (broker.py:633-641): an UNSUBSCRIBE and a
    SUBSCRIBE of the same filter sent back to back left the client unsubscribed (without
    5.'s change only when the loop was busy; with it, whenever both packets arrive
    together). Here each is applied in the handler's task, in the order the packets came,
    as mosquitto does, and in the same order as the client's PUBLISHes (12).

Users and TLS:

15. A CONNECT was authenticated only after amqtt had acted on its client id
    (``_initialize_client_session``, broker.py:503-532): a clean session closed the connected
    client with that id (and sent its will), a persistent one took over its session -- an
    anonymous or wrong-password CONNECT could knock any node off the cluster. Here the
    credentials (``authenticate``), the will topic (7) and the client id are checked first;
    a refused CONNECT gets its CONNACK and touches nothing. A client id held by a session of
    another user is refused (CONNACK 2): one user cannot disconnect another by reusing its id.
16. TLS listeners: amqtt's SSL context asked clients for a certificate against the system CAs
    and allowed any TLS version; here it is TLS 1.2+, server certificate only (clients log in
    with a password), and the TLS handshake is bounded by ``connect_timeout``.

Sessions and acknowledgements (MQTT 3.1.1 sections 3.1.2.4 and 4.3-4.4; each case runs on
mosquitto too, tests/broker/test_broker_sessions.py):

17. No persistent session survived: amqtt's AnonymousAuthPlugin marks every session
    anonymous (plugins/authentication.py:37), and amqtt neither queues messages for an
    anonymous session (broker.py:1033-1037) nor keeps it once its client is away
    (_session_monitor, broker.py:364-366) -- "session present" was 0 and what was published
    meanwhile was lost. Here no session is anonymous (``authenticate`` decides who connects).
    A persistent session keeps its subscriptions and, while its client is away, its QoS 1/2
    messages; they go out in order when the client is back, each asked of ``may_read``
    again, with retain 0 (amqtt set it, broker.py:1128). As in mosquitto, a client has at most
    ``max_inflight`` messages unacknowledged (amqtt: no limit), at most ``max_queued`` more
    wait -- behind those, or while it is away -- and beyond that the newest are dropped.
    ``max_queued_bytes`` bounds them in bytes too (mosquitto's max_queued_bytes). A QoS 0
    message waits on no window, but it is held while a client does not read its socket (each
    send waits behind amqtt's write lock and drain): one for a client that has ``max_queued``
    messages or ``max_queued_bytes`` bytes still unwritten, while its socket takes no more,
    is dropped. A session whose client stays away ``session_expiry`` seconds ends. Drops and
    expiries are counted (``counters``, ``EmbeddedBroker.stats()``) and logged: each burst of
    drops when it starts (``broker.messages_dropped``) and with its count when it ends -- all
    written, the queue drained, the client resumed -- or every ``DROPS_REPORT_S`` while it
    lasts (``broker.queue_dropped``); an expiry with what it held (``broker.session_expired``).
18. A persistent CONNECT resumed a session a clean-session client had left in the table
    (session present 1 after a clean session), and one with the id of a connected client
    left that connection open (broker.py:567-575), whose later disconnect then marked the
    shared session away under the new connection. Here a clean session is never resumed,
    and the old connection is closed (its will out) before the session is resumed, as in 6.
    A takeover (6 or this) waits ``connect_timeout`` / 2 for the old connection to end; one
    that ends later has its client back on the new connection: it sends no will and leaves
    the session as it is (``broker.late_disconnect``).
19. Outgoing QoS 1/2: a task per message waited 5 s for PUBACK/PUBREC/PUBCOMP and removed
    the message from the session on timeout or disconnect (handler.py:318-328, 387-412), so
    nothing unacknowledged was ever sent again. Here no task waits: a message stays in the
    session's inflight_out until acknowledged (an acknowledgement lets the next waiting one
    go, 17), and a resumed session first sends each again, in order -- the PUBLISH with DUP
    set (asked of ``may_read`` again, as a queued one is), or the PUBREL once its PUBREC came
    [MQTT-4.4.0-1] -- then its queue, then live ones.
20. Incoming QoS 2: after a reconnect, the client's PUBREL got a PUBREC back and the message
    was never delivered (amqtt re-ran its receiving flow, handler.py:181-192). Here a QoS 2
    PUBLISH is kept in the session until its PUBREL, then routed once (a duplicate PUBLISH
    gets its PUBREC again and is not kept twice), and every PUBREL gets a PUBCOMP. A client
    has at most ``max_inflight`` of them unreleased (amqtt: no limit, each holding its
    payload); one more closes its connection, as mosquitto's test pub-qos2-inflight-exceeded
    requires (the mosquitto 2.0.11 our tests run acknowledges it, then loses it).
21. A message went to each subscriber at the subscription's QoS (broker.py:1023), a QoS 0
    publish became QoS 1 (and, with 17, would have been queued). Here it goes at the lower of
    the two [MQTT-3.8.4-6], as from mosquitto.
22. A PUBLISH to any "$" topic closed the publisher's connection (broker.py:772-776). Here,
    as mosquitto does, one to "$SYS/..." (the broker's own) is acknowledged and dropped, and
    another "$" topic is delivered -- never to a filter that starts with a wildcard
    [MQTT-4.7.2-1] (amqtt's ``_matches`` already keeps those apart).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import socket
import ssl
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar, cast

import structlog
from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action, ListenerType
from amqtt.errors import AMQTTError, MQTTError, NoDataError
from amqtt.events import BrokerEvents
from amqtt.mqtt.connack import IDENTIFIER_REJECTED, NOT_AUTHORIZED, ConnackPacket
from amqtt.mqtt.constants import QOS_0, QOS_1, QOS_2
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler, Subscription, UnSubscription
from amqtt.mqtt.puback import PubackPacket
from amqtt.mqtt.pubcomp import PubcompPacket
from amqtt.mqtt.publish import PublishPacket
from amqtt.mqtt.pubrec import PubrecPacket
from amqtt.mqtt.pubrel import PubrelPacket
from amqtt.mqtt.subscribe import SubscribePacket
from amqtt.mqtt.unsubscribe import UnsubscribePacket
from amqtt.session import IncomingApplicationMessage, OutgoingApplicationMessage, Session
from amqtt.utils import gen_client_id

from linguamq.broker.errors import PayloadTooLargeError
from linguamq.broker.policy import Authenticate, ClientInfo, TopicPolicy

SUBSCRIBE_FAILED = 0x80  # SUBACK return code of a refused filter
# MQTT strings (topics, client ids, will messages) are at most 65535 bytes: every read amqtt
# makes of a packet is at most that long, except the payload of a PUBLISH.
MAX_STRING_READ = 65_535
KEEPALIVE_GRACE = 1.5  # [MQTT-3.1.2-24]
OUTBOX = "linguamq.outbox"  # key of a session's _Outbox in Session.attributes
DROPS_REPORT_S = 60.0  # a burst of drops that goes on is logged again this often

T = TypeVar("T")


class _OversizedPacket(PayloadTooLargeError, AMQTTError):
    """Raised inside amqtt's reader loop, which ends the connection on an AMQTTError."""


class _BoundedReader(StreamReaderAdapter):
    """amqtt's stream reader that refuses to read a PUBLISH payload above ``limit`` bytes,
    and tells the connection's keep-alive watchdog (if any) that the client is alive."""

    def __init__(self, reader: asyncio.StreamReader, *, limit: int, peer: object) -> None:
        super().__init__(reader)
        self._limit = limit
        self._peer = peer
        self.watchdog: _Watchdog | None = None

    async def read(self, n: int = -1) -> bytes:
        if n > self._limit:
            structlog.get_logger().warning("broker.payload_too_large", peer=self._peer,
                                           size=n, limit=self._limit)
            raise _OversizedPacket(f"payload of {n} bytes exceeds max_payload={self._limit}")
        # StreamReaderAdapter.read (adapters.py:148-152) without its extra coroutine: amqtt
        # reads a packet a few bytes at a time, seven reads for a PUBLISH.
        data = await (self._reader.read(n) if n == -1 else self._reader.readexactly(n))
        if self.watchdog is not None:
            self.watchdog.touch()
        return data


class _Watchdog:
    """Calls ``expire`` once nothing was read for ``limit`` seconds (5).

    One timer per connection, re-armed only when it fires early: a read costs a clock read,
    where a timeout around each read (amqtt's) costs a task and a timer per packet."""

    def __init__(self, limit: float, expire: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._limit = limit
        self._expire = expire
        self._last = self._loop.time()
        self._timer: asyncio.TimerHandle | None = self._loop.call_later(limit, self._check)

    def touch(self) -> None:
        self._last = self._loop.time()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check(self) -> None:
        idle = self._loop.time() - self._last
        if idle >= self._limit:
            self._timer = None
            self._expire()
        else:
            self._timer = self._loop.call_later(self._limit - idle, self._check)


class _ClientWriter(StreamWriterAdapter):
    """amqtt's stream writer that also knows its transport and the task serving the client,
    so the broker can close a connection from a synchronous callback and await its end."""

    def __init__(self, writer: asyncio.StreamWriter, task: asyncio.Task[Any]) -> None:
        super().__init__(writer)
        self.transport = writer.transport
        self.task = task

    def abort(self) -> None:
        if not self.transport.is_closing():
            self.transport.abort()


class _Item(NamedTuple):
    """A message on its way to one client."""

    topic: str
    data: bytes | bytearray
    qos: int
    retain: bool


@dataclasses.dataclass(eq=False)
class _Outbox:
    """What a session sends besides the messages in flight (17): the messages waiting, in
    order -- while its client is away, or behind a full in-flight window -- and the
    connection it is live on once resumed."""

    queued: collections.deque[_Item] = dataclasses.field(default_factory=collections.deque)
    queued_bytes: int = 0  # payload and topic bytes of ``queued``
    # Packets handed to the connection and not yet written out: each holds its payload while
    # it waits behind a client that does not read its socket (amqtt's write lock and drain).
    sending: int = 0
    sending_bytes: int = 0
    live: BrokerProtocolHandler | None = None  # set by _resume, cleared on disconnect
    away_since: float = 0.0  # event loop time of the last disconnect
    dropped: int = 0  # messages dropped in this burst: since the queue last had room
    drops_since: float = 0.0  # event loop time of the first drop of this burst


def _size(item: _Item) -> int:
    return len(item.data) + len(item.topic)


def _outbox(session: Session) -> _Outbox:
    outbox = session.attributes.get(OUTBOX)
    if not isinstance(outbox, _Outbox):
        outbox = session.attributes[OUTBOX] = _Outbox()
    return outbox


def _topic_problem(topic: str | None) -> str | None:
    """Why a client may not PUBLISH to ``topic`` at all (a protocol error), or None."""
    if not topic:
        return "empty topic [MQTT-4.7.3-1]"
    if "#" in topic or "+" in topic:
        return "wildcard in a topic name [MQTT-3.3.2-2]"
    return None


def _done(value: T) -> asyncio.Future[T]:
    """A future that already holds ``value``: what amqtt's client loop hands its handlers."""
    future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


def tune_socket(sock: Any) -> None:
    """No Nagle delay: activation tensors and their acks must leave at once."""
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # the peer may already be gone
            pass


class FixedBroker(Broker):
    """amqtt's broker with the overrides listed in this module's docstring.

    Must be constructed inside a running event loop (amqtt's ``Broker.__init__`` takes it).
    """

    def __init__(self, config: dict[str, Any], *, max_payload: int, connect_timeout: float,
                 max_inflight: int, max_queued: int, max_queued_bytes: int, session_expiry: float,
                 may_read: TopicPolicy | None, may_publish: TopicPolicy | None,
                 authenticate: Authenticate | None = None) -> None:
        super().__init__(config)
        self._authenticate_user = authenticate
        self._max_payload = max(max_payload, MAX_STRING_READ)
        self._connect_timeout = connect_timeout
        self._max_inflight = max_inflight
        self._max_queued = max_queued
        self._max_queued_bytes = max_queued_bytes  # 0: no limit in bytes
        self._session_expiry = session_expiry
        # Messages dropped (a full queue, an expired session) and sessions expired, ever.
        self.counters = {"queue_dropped": 0, "sessions_expired": 0}
        self._may_read = may_read
        self._may_publish = may_publish
        self._connections: dict[asyncio.Task[Any], asyncio.WriteTransport] = {}
        # Connections a takeover stopped waiting for (18): their late end is no disconnect.
        self._superseded: weakref.WeakSet[BrokerProtocolHandler] = weakref.WeakSet()
        self._log = structlog.get_logger().bind(component="broker")

    # --- addresses and connections -------------------------------------------------------

    def bound_address(self, listener: str = "default") -> tuple[str, int]:
        """(host, port) a listener is bound to; the port is real even if 0 was asked."""
        server = self._servers[listener].instance
        host, port = server.sockets[0].getsockname()[:2]
        return host, port

    @staticmethod
    def _create_ssl_context(listener: Any) -> ssl.SSLContext:
        # (16) Replaces broker.py:307-324: amqtt asked every client for a certificate
        # (CERT_OPTIONAL, against the system CAs) and took the default minimum version.
        # Clients authenticate with a password here; the server proves itself with its cert.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(str(listener["certfile"]), str(listener["keyfile"]))
        except (OSError, ssl.SSLError) as exc:
            raise AMQTTError(f"cannot load the TLS certificate {listener['certfile']} "
                             f"and key {listener['keyfile']}: {exc}") from exc
        return context

    async def _create_server_instance(self, listener_name: str, listener_type: Any, address: str | None,
                                      port: int, ssl_context: ssl.SSLContext | None) -> Any:
        if ssl_context is None or listener_type != ListenerType.TCP:
            return await super()._create_server_instance(listener_name, listener_type, address, port,
                                                         ssl_context)
        # (16) A TLS handshake is bounded like a CONNECT (asyncio's default waits 60 s).
        return await asyncio.start_server(
            functools.partial(self.stream_connected, listener_name=listener_name), address, port,
            reuse_address=True, ssl=ssl_context, ssl_handshake_timeout=self._connect_timeout)

    def connection_transports(self) -> list[asyncio.BaseTransport]:
        return list(self._connections.values())

    async def close_connections(self, timeout: float) -> None:
        """Abort every connection still open and wait (bounded) for its task to end."""
        for transport in self._connections.values():
            if not transport.is_closing():
                transport.abort()
        tasks = set(self._connections)
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def abandon(self) -> None:
        """Close the listeners whatever amqtt's state (after a failed start or stop)."""
        for server in self._servers.values():
            await server.close_instance()

    async def stream_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               listener_name: str) -> None:
        # Replaces amqtt's (broker.py:439) to tune the socket and wrap the streams (9, 10).
        task = cast("asyncio.Task[Any]", asyncio.current_task())  # asyncio runs us in a task
        self._connections[task] = writer.transport
        bounded: _BoundedReader | None = None
        try:
            tune_socket(writer.get_extra_info("socket"))
            bounded = _BoundedReader(reader, limit=self._max_payload,
                                     peer=writer.get_extra_info("peername"))
            await self._client_connected(listener_name, bounded, _ClientWriter(writer, task))
        finally:
            if bounded is not None and bounded.watchdog is not None:
                bounded.watchdog.cancel()
            # amqtt leaves the socket open on some early exits (a refused PUBLISH topic,
            # broker.py:760-776; a CONNECT that fails to parse): never leak it.
            if not writer.transport.is_closing():
                writer.transport.abort()
            del self._connections[task]

    async def _initialize_client_session(self, reader: Any, writer: Any, remote_address: str,
                                         remote_port: int) -> tuple[BrokerProtocolHandler, Session]:
        try:
            handler, session = await asyncio.wait_for(
                self._open_session(reader, writer, remote_address, remote_port), self._connect_timeout)
        except TimeoutError as exc:  # (8); amqtt's caller handles AMQTTError by dropping the client
            raise AMQTTError(f"no CONNECT from {remote_address}:{remote_port} "
                             f"within {self._connect_timeout} s") from exc
        self._enforce_keepalive(session, reader, writer)
        # (12, 14) The handler class is hard-wired too: this one instance's packet handlers.
        handler.handle_publish = functools.partial(self._handle_publish, handler)
        handler.handle_subscribe = functools.partial(self._handle_subscribe, handler)
        handler.handle_unsubscribe = functools.partial(self._handle_unsubscribe, handler)
        # (19, 20) Acknowledgements of both directions, and what a resumed session sends first.
        handler.handle_puback = functools.partial(self._on_puback, handler)
        handler.handle_pubrec = functools.partial(self._on_pubrec, handler)
        handler.handle_pubcomp = functools.partial(self._on_pubcomp, handler)
        handler.handle_pubrel = functools.partial(self._on_pubrel, handler)
        handler._retry_deliveries = functools.partial(self._resume, handler)
        return handler, session

    async def _open_session(self, reader: Any, writer: Any, remote_address: str,
                            remote_port: int) -> tuple[BrokerProtocolHandler, Session]:
        # (15) amqtt's _initialize_client_session (broker.py:479-535) with the admission
        # checks first: amqtt took over (closed) the connected client with the same id, or
        # resumed its persistent session, before it authenticated the newcomer.
        try:
            handler, session = await BrokerProtocolHandler.init_from_connect(reader, writer, self.plugins_manager)
        except MQTTError as exc:  # amqtt answered (bad protocol, flags) or could not parse
            with contextlib.suppress(OSError):
                await writer.close()
            raise AMQTTError(f"invalid CONNECT from {remote_address}:{remote_port}: {exc}") from exc
        except (AMQTTError, NoDataError) as exc:
            raise AMQTTError(f"no CONNECT from {remote_address}:{remote_port}: {exc}") from exc
        refusal = await self._refusal(session)
        if refusal is not None:
            code, reason = refusal
            self._log.warning("broker.connect_refused", client=session.client_id, username=session.username,
                              peer=f"{remote_address}:{remote_port}", code=code, reason=reason)
            try:
                await ConnackPacket.build(0, code).to_stream(writer)
                await writer.close()
            except OSError:  # the client did not wait for its answer (reset)
                pass
            raise AMQTTError(f"CONNECT of {session.client_id!r} refused: {reason}")
        if session.clean_session:
            if session.client_id:
                await self._delete_session(session.client_id)
            else:
                session.client_id = gen_client_id()
            session.parent = 0
        else:
            session = await self._resumed(session)
        return handler, session

    async def _resumed(self, session: Session) -> Session:
        """(18) The persistent session a clean-session = 0 CONNECT continues (session present
        1), or ``session`` itself, new (0). A session left by a clean-session client is not
        continued (amqtt resumed it, broker.py:517-530); a connection still open on the
        session is closed first, its will out, as for a clean takeover (6)."""
        client_id = session.client_id or ""
        existing = self._sessions.get(client_id, (None, None))[0]
        if existing is not None and existing.clean_session:
            await self._delete_session(client_id)
            existing = None
        if existing is None:
            session.parent = 0
            return session
        await self._close_connection(client_id)
        for name in ("will_flag", "will_message", "will_topic", "will_qos", "will_retain", "keep_alive",
                     "username", "password", "remote_address", "remote_port", "ssl_object"):
            setattr(existing, name, getattr(session, name))
        existing.parent = 1
        return existing

    async def _refusal(self, session: Session) -> tuple[int, str] | None:
        """(CONNACK code, why) if this CONNECT must be refused, else None."""
        # PBKDF2 on purpose takes ~20 ms: off the loop (hashlib releases the GIL).
        if self._authenticate_user is not None and not await asyncio.to_thread(
                self._authenticate_user, session.username, session.password):
            return NOT_AUTHORIZED, ("no username" if session.username is None
                                    else f"wrong username or password for {session.username!r}")
        held = self._sessions.get(session.client_id or "", (None, None))[0]
        if held is not None and held.username != session.username:
            # (15) Another user's client id: taking it over would disconnect that client.
            return IDENTIFIER_REJECTED, f"client id held by another user ({held.username!r})"
        will_topic = session.will_topic if session.will_flag else None
        if will_topic is not None and self._may_publish is not None \
                and not self._allowed(self._may_publish, session, will_topic):
            return NOT_AUTHORIZED, f"will topic {will_topic!r} not allowed"  # (7)
        return None

    def _enforce_keepalive(self, session: Session, reader: Any, writer: Any) -> None:
        # (5) amqtt's only keep-alive check is a timeout around each packet read of the
        # handler's reader loop (handler.py:466), whose expiry calls a no-op
        # (broker_handler.py:86). Here a watchdog on the connection closes it after
        # 1.5 x keep-alive without a read instead, and amqtt's session says keep-alive 0 (it
        # reads that when the handler is attached and its reader loop starts, after this):
        # no timeout task and timer around every packet read, and no write timer re-armed
        # on every packet sent (handler.py:573-576, for a callback that is a no-op,
        # broker_handler.py:83).
        keep_alive, session.keep_alive = session.keep_alive, 0
        if keep_alive > 0 and isinstance(reader, _BoundedReader) and isinstance(writer, _ClientWriter):
            reader.watchdog = _Watchdog(keep_alive * KEEPALIVE_GRACE, functools.partial(
                self._keepalive_expired, writer, session.client_id))

    def _keepalive_expired(self, writer: _ClientWriter, client_id: str | None) -> None:
        self._log.warning("broker.keepalive_expired", client=client_id)
        writer.abort()

    async def _delete_session(self, client_id: str) -> None:
        # (6) Take over: close the connected client with this id and let its will go out
        # before amqtt forgets its session and the new connection is acknowledged.
        await self._close_connection(client_id)
        await super()._delete_session(client_id)

    async def _close_connection(self, client_id: str) -> None:
        """Close the connection of the connected client ``client_id`` (if any) and wait,
        bounded, until its disconnect is handled: will out, session marked away (6, 18)."""
        session, handler = self._sessions.get(client_id, (None, None))
        writer = handler.writer if handler is not None else None
        if (session is not None and session.transitions.is_connected()
                and isinstance(writer, _ClientWriter)):
            self._log.info("broker.takeover", client=client_id)
            writer.abort()
            done, _ = await asyncio.wait({writer.task}, timeout=self._connect_timeout / 2)
            if not done and handler is not None:
                self._log.warning("broker.takeover_slow", client=client_id,
                                  waited_s=self._connect_timeout / 2)
                self._superseded.add(handler)

    # --- SUBSCRIBE and UNSUBSCRIBE in the order sent (14) ---------------------------------------

    async def _handle_subscribe(self, handler: BrokerProtocolHandler, packet: SubscribePacket) -> None:
        # (14) Replaces BrokerProtocolHandler.handle_subscribe (broker_handler.py:114-123): the
        # subscription is made in this task, in the order the packets came, instead of on a
        # queue of its own that _client_message_loop serves (broker.py:633-641).
        session = handler.session
        if session is None or packet.variable_header is None or packet.payload is None:
            await BrokerProtocolHandler.handle_subscribe(handler, packet)  # amqtt's own flow
            return
        request = Subscription(packet.variable_header.packet_id, packet.payload.topics)
        await self._handle_subscription(session, handler, _done(request))

    async def _handle_unsubscribe(self, handler: BrokerProtocolHandler, packet: UnsubscribePacket) -> None:
        # (14) Replaces BrokerProtocolHandler.handle_unsubscribe (broker_handler.py:125-133).
        session = handler.session
        if session is None or packet.variable_header is None or packet.payload is None:
            await BrokerProtocolHandler.handle_unsubscribe(handler, packet)  # amqtt's own flow
            return
        request = UnSubscription(packet.variable_header.packet_id, packet.payload.topics)
        await self._handle_unsubscription(session, handler, _done(request))

    # --- live delivery (12) ------------------------------------------------------------------

    async def _handle_publish(self, handler: BrokerProtocolHandler, packet: PublishPacket) -> None:
        # (12) Replaces ProtocolHandler.handle_publish (handler.py:720-734) of one client's
        # handler for QoS 0 and 1: the message is routed at once, in this task, instead of
        # going through the session's delivered_message_queue to _client_message_loop
        # (broker.py:606-644), then through _broadcast_queue to a _run_broadcast task
        # (broker.py:959-1061); and for QoS 1 the PUBACK leaves after the deliveries started.
        session = handler.session
        header = packet.variable_header
        if (session is None or header is None or packet.topic_name is None or packet.data is None
                or (packet.qos == QOS_0 and packet.dup_flag)):
            await BrokerProtocolHandler.handle_publish(handler, packet)  # amqtt's own flow
            return
        message = IncomingApplicationMessage(header.packet_id, packet.topic_name, packet.qos,
                                             packet.data, packet.retain_flag)
        message.publish_packet = packet
        if packet.qos == QOS_2:
            await self._receive_qos2(handler, session, message)
            return
        # The checks, events, publish policy, broadcast and retain of amqtt, in that order
        # (22). It answers False for a topic no client may publish to: the client is dropped.
        if not await self._handle_message_delivery(session, handler, _done(message)):
            if isinstance(handler.writer, _ClientWriter):
                handler.writer.abort()
            return
        if packet.qos == QOS_1:
            await asyncio.sleep(0)  # the deliveries just started write first, then the PUBACK
            puback = PubackPacket.build(header.packet_id)
            await handler._send_packet(puback)  # as amqtt's own QoS 1 flow does (handler.py:335)
            message.puback_packet = puback

    async def _broadcast_message(self, session: Session | None, topic: str | None,
                                 data: bytes | bytearray | None, force_qos: int | None = None) -> None:
        # (11, 12) Replaces amqtt's hand-off to _broadcast_queue and its _run_broadcast task
        # (broker.py:1009-1061, 1104-1114) with the same loop, run now: one task per delivery,
        # kept in amqtt's _tasks_queue, which its shutdown cancels. It also skips
        # _run_broadcast's f"Processing broadcast message: {broadcast}" (broker.py:1013), built
        # even with DEBUG off, the repr of the whole payload (~12 ms per MiB of tensor).
        # (21) ``force_qos`` is the QoS the message was published with (a will's QoS for a
        # will): each subscriber gets it at the lower of that and its subscription's QoS.
        self._reap_delivery_tasks()
        if topic is None or data is None:
            return
        for target, sub_qos in self._live_targets(topic):
            await self._deliver_live(session, target, topic, data,
                                     sub_qos if force_qos is None else min(force_qos, sub_qos))

    def _live_targets(self, topic: str) -> list[tuple[Session, int]]:
        """(13) Each client whose filters match ``topic`` once, with the highest QoS of its
        matching subscriptions [MQTT-3.3.5-1], as mosquitto does; amqtt sent one copy per
        matching filter (broker.py:1015-1061)."""
        targets: dict[int, tuple[Session, int]] = {}  # by session object, as amqtt's table holds them
        for topic_filter, subscriptions in list(self._subscriptions.items()):
            if not self._matches(topic, topic_filter):
                continue
            for target, sub_qos in subscriptions:
                known = targets.get(id(target))
                if known is None or sub_qos > known[1]:
                    targets[id(target)] = (target, sub_qos)
        return list(targets.values())

    async def _deliver_live(self, source: Session | None, target: Session, topic: str,
                            data: bytes | bytearray, qos: int) -> None:
        """One message to one subscriber: amqtt's _run_broadcast loop body (broker.py:1025-1061),
        sent on the client's connection once its session is resumed, else queued (17)."""
        if await self._topic_filtering(target, topic=topic, action=Action.RECEIVE):
            self._offer(target, _Item(topic, data, qos, False))

    def _reap_delivery_tasks(self) -> None:
        """Forget finished deliveries, logging failures (what amqtt's _broadcast_loop did)."""
        tasks = self._tasks_queue
        while tasks and tasks[0].done():
            task = tasks.popleft()
            if not task.cancelled() and task.exception() is not None:
                self._log.warning("broker.delivery_failed", error=repr(task.exception()))

    # --- what a client publishes (20, 22) ---------------------------------------------------

    async def _handle_message_delivery(self, client_session: Session, handler: BrokerProtocolHandler,
                                       wait_deliver: asyncio.Future[Any]) -> bool:
        # Replaces broker.py:742-791: amqtt's checks, events, publish policy, broadcast and
        # retain, except for "$" topics (22) and with the QoS it was published at (21).
        # False: a protocol error, the client's connection must close.
        message = wait_deliver.result()
        await self.plugins_manager.fire_event(BrokerEvents.MESSAGE_RECEIVED,
                                              client_id=client_session.client_id, message=message)
        if message is None:
            return True
        problem = _topic_problem(message.topic)
        if problem is not None:
            self._log.warning("broker.invalid_topic", client=client_session.client_id, topic=message.topic,
                              problem=problem)
            return False
        if message.topic.startswith("$SYS"):  # (22) the broker's own: acknowledged, dropped
            self._log.debug("broker.sys_publish_dropped", client=client_session.client_id, topic=message.topic)
            return True
        if not await self._topic_filtering(client_session, topic=message.topic, action=Action.PUBLISH):
            self._log.info("broker.publish_denied", client=client_session.client_id, topic=message.topic)
            return True
        await self.plugins_manager.fire_event(BrokerEvents.MESSAGE_BROADCAST,
                                              client_id=client_session.client_id, message=message)
        await self._broadcast_message(client_session, message.topic, message.data, message.qos)
        if message.publish_packet is not None and message.publish_packet.retain_flag:
            await self.retain_message(client_session, message.topic, message.data, message.qos)
        return True

    async def _receive_qos2(self, handler: BrokerProtocolHandler, session: Session,
                            message: IncomingApplicationMessage) -> None:
        """(20) A QoS 2 PUBLISH is kept until its PUBREL, then routed once; a duplicate
        (same packet id, before the PUBREL) gets its PUBREC again and is not kept twice."""
        if _topic_problem(message.topic) is not None:
            await self._handle_message_delivery(session, handler, _done(message))  # logs it
            if isinstance(handler.writer, _ClientWriter):
                handler.writer.abort()
            return
        packet_id = cast("int", message.packet_id)
        if packet_id not in session.inflight_in and len(session.inflight_in) >= self._max_inflight:
            # Each one holds its payload (in a persistent session, for session_expiry): a
            # client may leave at most max_inflight unreleased, as mosquitto enforces.
            self._log.warning("broker.inflight_exceeded", client=session.client_id,
                              max_inflight=self._max_inflight)
            if isinstance(handler.writer, _ClientWriter):
                handler.writer.abort()
            return
        session.inflight_in.setdefault(packet_id, message)
        await handler._send_packet(PubrecPacket.build(packet_id))

    async def _on_pubrel(self, handler: BrokerProtocolHandler, packet: PubrelPacket) -> None:
        # Replaces ProtocolHandler.handle_pubrel (handler.py:710-718), which only woke amqtt's
        # waiting task (a PUBREL after a reconnect found none: a PUBREC came back instead).
        session, packet_id = handler.session, packet.packet_id
        if session is None or packet_id in handler._pubrel_waiters:
            await BrokerProtocolHandler.handle_pubrel(handler, packet)  # amqtt's own flow
            return
        message = session.inflight_in.pop(packet_id, None)
        if message is not None:
            if not await self._handle_message_delivery(session, handler, _done(message)):
                if isinstance(handler.writer, _ClientWriter):
                    handler.writer.abort()
                return
            await asyncio.sleep(0)  # the deliveries just started write first, then the PUBCOMP
        # Every PUBREL is answered, a repeated one too [MQTT-4.3.3], as mosquitto does.
        await handler._send_packet(PubcompPacket.build(packet_id))

    # --- what a client is sent: acknowledged, queued, sent again (17, 19) -------------------

    def _offer(self, session: Session, item: _Item) -> None:
        """One message for one client: sent now if its session is live, nothing waits before
        it and its in-flight window has room; else queued behind (17). A clean session that
        is away gets nothing; a persistent one keeps QoS 1/2 [MQTT-3.1.2-5]."""
        outbox = _outbox(session)
        handler = outbox.live
        if handler is not None and not outbox.queued and (
                item.qos == QOS_0 or len(session.inflight_out) < self._max_inflight):
            if item.qos == QOS_0 and self._not_reading(handler, outbox, item):
                self._dropped(session, outbox, "not_reading")  # a QoS 0 waits on no window: bounded here
                return
            self._transmit(session, handler, item)
        elif handler is not None or session.transitions.is_connected() or (
                not session.clean_session and item.qos != QOS_0):
            self._enqueue(session, outbox, item)

    def _transmit(self, session: Session, handler: BrokerProtocolHandler, item: _Item) -> None:
        """Start sending one PUBLISH. QoS 1/2: it stays in the session's inflight_out until
        acknowledged, whatever happens to the connection (19)."""
        if item.qos == QOS_0:
            packet = PublishPacket.build(item.topic, bytes(item.data), None, False, QOS_0, item.retain)
            self._send(session, handler, packet, _size(item))
            return
        message = OutgoingApplicationMessage(session.next_packet_id, item.topic, item.qos, item.data, item.retain)
        message.publish_packet = message.build_publish_packet()
        session.inflight_out[cast("int", message.packet_id)] = message
        self._send(session, handler, message.publish_packet, _size(item))

    def _send(self, session: Session, handler: BrokerProtocolHandler, packet: PublishPacket | PubrelPacket,
              size: int) -> None:
        # Started in order; the handler's write lock (FIFO) keeps that order on the wire.
        task = asyncio.ensure_future(handler._send_packet(packet))
        outbox = _outbox(session)
        outbox.sending += 1
        outbox.sending_bytes += size
        task.add_done_callback(functools.partial(self._sent, session, outbox, size))
        self._tasks_queue.append(task)

    def _sent(self, session: Session, outbox: _Outbox, size: int, _: asyncio.Future[Any]) -> None:
        outbox.sending -= 1
        outbox.sending_bytes -= size
        if outbox.dropped and not outbox.sending and not outbox.queued:  # all written: burst over
            self._report_drops(session, outbox)

    def _not_reading(self, handler: BrokerProtocolHandler, outbox: _Outbox, item: _Item) -> bool:
        """Whether the client is not taking what it is sent: the sends it has waiting reach
        the queue's limits and its socket has bytes the kernel would not take. (A burst to a
        client that reads is not dropped: amqtt parses a whole read's PUBLISHes before any
        send runs, so a thousand sends can wait on a connection that has nothing buffered.)"""
        writer = handler.writer
        return (self._over_limits(outbox.sending, outbox.sending_bytes, _size(item))
                and isinstance(writer, _ClientWriter) and writer.transport.get_write_buffer_size() > 0)

    def _over_limits(self, count: int, size: int, more: int) -> bool:
        """Whether ``count`` messages of ``size`` bytes held for a client leave no room for
        one more of ``more`` bytes: ``max_queued`` messages, ``max_queued_bytes`` bytes (one
        message alone always fits, however large: max_payload bounds it)."""
        return count >= self._max_queued or (
            self._max_queued_bytes > 0 and count > 0 and size + more > self._max_queued_bytes)

    def _enqueue(self, session: Session, outbox: _Outbox, item: _Item) -> None:
        """(17) Keep a message until it can go; beyond ``max_queued`` waiting (or
        ``max_queued_bytes``), the newest is dropped, as mosquitto's settings of those names do."""
        if self._over_limits(len(outbox.queued), outbox.queued_bytes, _size(item)):
            self._dropped(session, outbox, "queue_full")
            return
        outbox.queued.append(item)
        outbox.queued_bytes += _size(item)

    def _refill(self, session: Session, outbox: _Outbox) -> None:
        """Send what waits, in order, while the in-flight window has room; each message is
        asked of ``may_read`` again (the policy may have changed while it waited)."""
        handler = outbox.live
        while handler is not None and outbox.queued:
            item = outbox.queued[0]
            if item.qos != QOS_0 and len(session.inflight_out) >= self._max_inflight:
                return
            outbox.queued.popleft()
            outbox.queued_bytes -= _size(item)
            if self._may_read is None or self._allowed(self._may_read, session, item.topic):
                self._transmit(session, handler, item)
        if handler is not None and outbox.dropped:  # the queue drained: that burst is over
            self._report_drops(session, outbox)

    def _dropped(self, session: Session, outbox: _Outbox, reason: str, count: int = 1) -> None:
        """Count messages a client will never get. The first of a burst is logged at once, the
        burst's count when it ends (the queue drained, the client resumed) or every
        ``DROPS_REPORT_S`` while it goes on: a node stays connected for days."""
        now = asyncio.get_running_loop().time()
        if outbox.dropped == 0:
            self._log.warning("broker.messages_dropped", client=session.client_id, reason=reason,
                              max_queued=self._max_queued)
            outbox.drops_since = now
        outbox.dropped += count
        self.counters["queue_dropped"] += count
        if now - outbox.drops_since >= DROPS_REPORT_S:
            self._report_drops(session, outbox)

    def _report_drops(self, session: Session, outbox: _Outbox) -> None:
        self._log.warning("broker.queue_dropped", client=session.client_id, dropped=outbox.dropped,
                          max_queued=self._max_queued)
        outbox.dropped = 0

    async def _resume(self, handler: BrokerProtocolHandler) -> None:
        # Replaces ProtocolHandler._retry_deliveries (handler.py:174-194), run when a
        # connection starts: (19) what the client had not acknowledged goes again first, in
        # the order first sent -- the PUBLISH with DUP set, or the PUBREL once a PUBREC came
        # [MQTT-4.4.0-1] -- then what was queued while it was away, then live messages. Each
        # PUBLISH, sent before or not, is asked of may_read again (the policy may have changed
        # meanwhile); a refused one is forgotten. A PUBREL carries no payload: it goes. All
        # started in this one step, so nothing overtakes.
        session = handler.session
        if session is None:
            return
        outbox = _outbox(session)
        for packet_id, message in list(session.inflight_out.items()):
            if message.qos == QOS_2 and message.pubrec_packet is not None:
                self._send(session, handler, PubrelPacket.build(packet_id), 0)
            elif self._may_read is not None and not self._allowed(self._may_read, session, message.topic):
                del session.inflight_out[packet_id]
            else:
                message.publish_packet = message.build_publish_packet(dup=True)
                self._send(session, handler, message.publish_packet, len(message.data or b"") + len(message.topic))
        outbox.live = handler
        self._refill(session, outbox)
        if outbox.dropped:  # while it was away (the refill found its queue longer than its window)
            self._report_drops(session, outbox)

    async def _on_puback(self, handler: BrokerProtocolHandler, packet: PubackPacket) -> None:
        # Replaces ProtocolHandler.handle_puback (handler.py:677-688): no task waits for it (19).
        session, packet_id = handler.session, cast("Any", packet.variable_header).packet_id
        if session is None or packet_id in handler._puback_waiters:
            await BrokerProtocolHandler.handle_puback(handler, packet)  # amqtt's own flow
            return
        message = session.inflight_out.get(packet_id)
        if message is not None and message.qos == QOS_1:
            del session.inflight_out[packet_id]
            self._refill(session, _outbox(session))

    async def _on_pubrec(self, handler: BrokerProtocolHandler, packet: PubrecPacket) -> None:
        # Replaces ProtocolHandler.handle_pubrec (handler.py:690-698) (19).
        session, packet_id = handler.session, packet.packet_id
        if session is None or packet_id in handler._pubrec_waiters:
            await BrokerProtocolHandler.handle_pubrec(handler, packet)  # amqtt's own flow
            return
        message = session.inflight_out.get(packet_id)
        if message is not None and message.qos == QOS_2:
            message.pubrec_packet = packet
        await handler._send_packet(PubrelPacket.build(packet_id))

    async def _on_pubcomp(self, handler: BrokerProtocolHandler, packet: PubcompPacket) -> None:
        # Replaces ProtocolHandler.handle_pubcomp (handler.py:700-708) (19).
        session, packet_id = handler.session, packet.packet_id
        if session is None or packet_id in handler._pubcomp_waiters:
            await BrokerProtocolHandler.handle_pubcomp(handler, packet)  # amqtt's own flow
            return
        message = session.inflight_out.get(packet_id)
        if message is not None and message.qos == QOS_2 and message.pubrec_packet is not None:
            del session.inflight_out[packet_id]
            self._refill(session, _outbox(session))

    async def _publish_session_retained_messages(self, session: Session) -> None:
        """Deliberately nothing: amqtt's queue for an away client (sent with retain set,
        broker.py:1116-1131) is replaced by the outbox that ``_resume`` sends (17)."""

    async def _handle_disconnect(self, client_session: Session, handler: BrokerProtocolHandler,
                                 disconnect_waiter: asyncio.Future[Any]) -> None:
        # (17) Away from now on: what follows is queued, not written to a closing connection.
        outbox = _outbox(client_session)
        if outbox.live in (handler, None):
            outbox.live = None
            outbox.away_since = asyncio.get_running_loop().time()
        if handler in self._superseded:
            # (18) A connection a takeover stopped waiting for, ending now: its client is back
            # on another connection. No will (it would say "offline" after the new connection
            # said "online", with the new connection's will fields, which _resumed copied), and
            # the session is not away (a later takeover would leave the live connection open).
            self._log.info("broker.late_disconnect", client=client_session.client_id)
            await self._stop_handler(handler)
            return
        await super()._handle_disconnect(client_session, handler, disconnect_waiter)

    async def _session_monitor(self) -> None:
        # Replaces broker.py:356-386 (17): sessions of clean-session clients end with their
        # connection, as in amqtt; a persistent one whose client stays away session_expiry
        # seconds ends too, counted and logged with what it still held.
        interval = min(1.0, self._session_expiry / 2)
        while True:
            await asyncio.sleep(interval)
            now = asyncio.get_running_loop().time()
            for client_id, (session, _) in list(self._sessions.items()):
                if session.transitions.state != "disconnected" or _outbox(session).live is not None:
                    continue  # (live: resumed by a connection that took over a slow-to-close one)
                if not session.clean_session and now - _outbox(session).away_since < self._session_expiry:
                    continue
                if not session.clean_session:
                    self._expired(session)
                await self._cleanup_session(client_id)

    def _expired(self, session: Session) -> None:
        outbox = _outbox(session)
        lost = len(outbox.queued) + len(session.inflight_out)
        self.counters["sessions_expired"] += 1
        self.counters["queue_dropped"] += lost
        self._log.warning("broker.session_expired", client=session.client_id, dropped=lost,
                          away_s=round(self._session_expiry, 3))

    def _outboxes(self) -> list[_Outbox]:
        outboxes = [session.attributes.get(OUTBOX) for session, _ in list(self._sessions.values())]
        return [outbox for outbox in outboxes if isinstance(outbox, _Outbox)]

    def queued_messages(self) -> int:
        """Messages held for clients that are away or behind a full in-flight window (read
        from any thread: a snapshot)."""
        return sum(len(outbox.queued) for outbox in self._outboxes())

    def sending_messages(self) -> int:
        """Messages handed to connections and not yet written out (a snapshot, as above)."""
        return sum(outbox.sending for outbox in self._outboxes())

    # --- policies ---------------------------------------------------------------------------

    def _allowed(self, policy: TopicPolicy, session: Session, topic: str) -> bool:
        client = ClientInfo(client_id=session.client_id or "", username=session.username)
        try:
            return bool(policy(client, topic))
        except Exception:  # fail closed: a broken policy denies
            self._log.exception("broker.policy_failed", client=client.client_id, topic=topic)
            return False

    async def _topic_filtering(self, session: Session, topic: str, action: Action) -> bool:
        # Replaces amqtt's plugin fan-out (broker.py:893): live delivery (RECEIVE), client
        # PUBLISH and SUBSCRIBE all land here. It must not await anything: _run_broadcast
        # iterates self._subscriptions around this call (broker.py:1015-1025).
        match action:
            case Action.RECEIVE:
                policy = self._may_read
            case Action.PUBLISH:
                policy = self._may_publish
            case _:  # SUBSCRIBE: what a client may read is decided per message
                policy = None
        return policy is None or self._allowed(policy, session, topic)

    async def _authenticate(self, session: Session, listener: Any) -> bool:
        # Credentials, client id and will were checked before the session was opened (15,
        # _refusal); what is left is amqtt's plugin (anonymous: yes). (17) That plugin marks
        # every session anonymous (authentication.py:37), and amqtt neither queues messages
        # for an anonymous session (broker.py:1037) nor keeps it once its client is away
        # (broker.py:364-366): no persistent session ever survived. Ours do, as mosquitto's.
        accepted = await super()._authenticate(session, listener)
        session.is_anonymous = False
        return accepted

    # --- subscriptions and retained messages ---------------------------------------------

    async def add_subscription(self, subscription: tuple[str, int], session: Session) -> int:
        granted = await super().add_subscription(subscription, session)
        if granted != SUBSCRIBE_FAILED:  # (4) a new SUBSCRIBE replaces the old QoS
            entries = self._subscriptions.get(subscription[0], [])
            for index, (subscriber, _) in enumerate(entries):
                if subscriber.client_id == session.client_id:
                    entries[index] = (subscriber, granted)
        return granted

    async def _handle_subscription(self, client_session: Session, handler: BrokerProtocolHandler,
                                   subscribe_waiter: asyncio.Future[Any]) -> None:
        # Replaces broker.py:703-722 (3): SUBACK, then each matching retained message once.
        request = subscribe_waiter.result()
        codes = [await self.add_subscription(sub, client_session) for sub in request.topics]
        await handler.mqtt_acknowledge_subscription(request.packet_id, codes)
        granted = [(sub[0], code) for sub, code in zip(request.topics, codes, strict=True)
                   if code != SUBSCRIBE_FAILED]
        for topic_filter, qos in granted:
            await self.plugins_manager.fire_event(
                BrokerEvents.CLIENT_SUBSCRIBED, client_id=client_session.client_id,
                topic=topic_filter, qos=qos)
        await self._deliver_retained(client_session, granted)

    async def _publish_retained_messages_for_subscription(self, subscription: tuple[str, int],
                                                          session: Session) -> None:
        """Deliberately nothing (1): its only remaining caller is amqtt's replay of retained
        messages for every filter of every client on CONNECT (broker.py:599-602)."""

    def _retained_for(self, session: Session,
                      granted: list[tuple[str, int]]) -> list[tuple[str, bytes | bytearray, int]]:
        """(topic, payload, qos) of each retained message the new filters match and the
        client may read, once each."""
        selected = []
        for topic, message in list(self._retained_messages.items()):
            qos = max((q for f, q in granted if self._matches(topic, f)), default=None)
            if qos is None:
                continue
            if self._may_read is not None and not self._allowed(self._may_read, session, topic):
                continue
            selected.append((topic, message.data, min(qos, message.qos or 0)))
        return selected

    async def _deliver_retained(self, session: Session, granted: list[tuple[str, int]]) -> None:
        # After the SUBACK, in order, like any other delivery to this client (17, 19).
        for topic, data, qos in self._retained_for(session, granted):
            self._offer(session, _Item(topic, data, qos, True))
