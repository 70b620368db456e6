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
   a FIN stayed "connected" forever and its will (status offline) never went out. Here the
   connection is aborted after 1.5 x keep-alive [MQTT-3.1.2-24], and the will follows.
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
    hands amqtt a memoryview, whose repr is short.
"""

from __future__ import annotations

import asyncio
import functools
import math
import socket
from typing import Any, cast

import structlog
from amqtt.adapters import StreamReaderAdapter, StreamWriterAdapter
from amqtt.broker import Broker
from amqtt.contexts import Action
from amqtt.errors import AMQTTError
from amqtt.events import BrokerEvents
from amqtt.mqtt.protocol.broker_handler import BrokerProtocolHandler
from amqtt.session import Session

from linguamq.broker.errors import PayloadTooLargeError
from linguamq.broker.policy import ClientInfo, TopicPolicy

SUBSCRIBE_FAILED = 0x80  # SUBACK return code of a refused filter
# MQTT strings (topics, client ids, will messages) are at most 65535 bytes: every read amqtt
# makes of a packet is at most that long, except the payload of a PUBLISH.
MAX_STRING_READ = 65_535
KEEPALIVE_GRACE = 1.5  # [MQTT-3.1.2-24]


class _OversizedPacket(PayloadTooLargeError, AMQTTError):
    """Raised inside amqtt's reader loop, which ends the connection on an AMQTTError."""


class _BoundedReader(StreamReaderAdapter):
    """amqtt's stream reader that refuses to read a PUBLISH payload above ``limit`` bytes."""

    def __init__(self, reader: asyncio.StreamReader, *, limit: int, peer: object) -> None:
        super().__init__(reader)
        self._limit = limit
        self._peer = peer

    async def read(self, n: int = -1) -> bytes:
        if n > self._limit:
            structlog.get_logger().warning("broker.payload_too_large", peer=self._peer,
                                           size=n, limit=self._limit)
            raise _OversizedPacket(f"payload of {n} bytes exceeds max_payload={self._limit}")
        return await super().read(n)


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
                 delivery_timeout: float, may_read: TopicPolicy | None,
                 may_publish: TopicPolicy | None) -> None:
        super().__init__(config)
        self._max_payload = max(max_payload, MAX_STRING_READ)
        self._connect_timeout = connect_timeout
        self._delivery_timeout = delivery_timeout
        self._may_read = may_read
        self._may_publish = may_publish
        self._connections: dict[asyncio.Task[Any], asyncio.BaseTransport] = {}
        self._log = structlog.get_logger().bind(component="broker")

    # --- addresses and connections -------------------------------------------------------

    def bound_address(self) -> tuple[str, int]:
        """(host, port) the default listener is bound to; the port is real even if 0 was asked."""
        server = self._servers["default"].instance
        host, port = server.sockets[0].getsockname()[:2]
        return host, port

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
        try:
            tune_socket(writer.get_extra_info("socket"))
            peer = writer.get_extra_info("peername")
            await self._client_connected(listener_name,
                                         _BoundedReader(reader, limit=self._max_payload, peer=peer),
                                         _ClientWriter(writer, task))
        finally:
            # amqtt leaves the socket open on some early exits (a refused PUBLISH topic,
            # broker.py:760-776; a CONNECT that fails to parse): never leak it.
            if not writer.transport.is_closing():
                writer.transport.abort()
            del self._connections[task]

    async def _initialize_client_session(self, reader: Any, writer: Any, remote_address: str,
                                         remote_port: int) -> tuple[BrokerProtocolHandler, Session]:
        try:
            handler, session = await asyncio.wait_for(
                super()._initialize_client_session(reader, writer, remote_address, remote_port),
                self._connect_timeout)
        except TimeoutError as exc:  # (8); amqtt's caller handles AMQTTError by dropping the client
            raise AMQTTError(f"no CONNECT from {remote_address}:{remote_port} "
                             f"within {self._connect_timeout} s") from exc
        self._enforce_keepalive(handler, session, writer)
        return handler, session

    def _enforce_keepalive(self, handler: BrokerProtocolHandler, session: Session,
                           writer: Any) -> None:
        # (5) The handler class is hard-wired in amqtt's _initialize_client_session
        # (broker.py:489, BrokerProtocolHandler.init_from_connect), so instead of a subclass
        # this one handler instance gets a read-timeout callback that closes its connection.
        if session.keep_alive > 0:
            session.keep_alive = math.ceil(session.keep_alive * KEEPALIVE_GRACE)
        if isinstance(writer, _ClientWriter):
            handler.handle_read_timeout = functools.partial(  # type: ignore[method-assign]
                self._keepalive_expired, writer, session.client_id)

    def _keepalive_expired(self, writer: _ClientWriter, client_id: str | None) -> None:
        self._log.warning("broker.keepalive_expired", client=client_id)
        writer.abort()

    async def _delete_session(self, client_id: str) -> None:
        # (6) Take over: close the connected client with this id and let its will go out
        # before amqtt forgets its session and the new connection is acknowledged.
        session, handler = self._sessions.get(client_id, (None, None))
        writer = handler.writer if handler is not None else None
        if (session is not None and session.transitions.is_connected()
                and isinstance(writer, _ClientWriter)):
            self._log.info("broker.takeover", client=client_id)
            writer.abort()
            await asyncio.wait({writer.task}, timeout=self._connect_timeout / 2)
        await super()._delete_session(client_id)

    async def _broadcast_message(self, session: Session | None, topic: str | None,
                                 data: bytes | bytearray | None, force_qos: int | None = None) -> None:
        # (11) _run_broadcast logs f"Processing broadcast message: {broadcast}" (broker.py:1013)
        # for every message: the f-string is built even with DEBUG off, and it is the repr of
        # the whole payload (about 12 ms per MiB of tensor). A memoryview has a short repr;
        # amqtt turns it back into bytes once per delivery (session.py:91, a memcpy).
        view = memoryview(data) if isinstance(data, bytes | bytearray) else data
        await super()._broadcast_message(session, topic, view, force_qos)  # type: ignore[arg-type]

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
        if not await super()._authenticate(session, listener):
            return False
        will_topic = session.will_topic if session.will_flag else None
        if will_topic is not None and self._may_publish is not None \
                and not self._allowed(self._may_publish, session, will_topic):
            self._log.warning("broker.will_denied", client=session.client_id, topic=will_topic)
            return False  # (7) CONNACK 5, not authorized
        return True

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
        await self._deliver_retained(client_session, handler, granted)

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

    async def _deliver_retained(self, session: Session, handler: BrokerProtocolHandler,
                                granted: list[tuple[str, int]]) -> None:
        selected = self._retained_for(session, granted)
        if not selected:
            return
        # Started in order; the handler's write lock keeps that order on the wire.
        sends = [handler.mqtt_publish(topic, data, qos, retain=True) for topic, data, qos in selected]
        try:
            results = await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True),
                                             self._delivery_timeout)
        except TimeoutError:
            self._log.warning("broker.retained_delivery_timeout", client=session.client_id,
                              messages=len(sends), timeout_s=self._delivery_timeout)
            return
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            self._log.warning("broker.retained_delivery_failed", client=session.client_id,
                              failed=len(failed), error=repr(failed[0]))
