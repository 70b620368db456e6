"""A typed MQTT client over paho: the one place our processes talk MQTT.

Why a wrapper: paho does not set TCP_NODELAY (each activation would wait for Nagle's
delayed ACK), does not re-subscribe after a reconnect on a clean session, and hands
handlers raw bytes. Here every subscription is decoded at the edge: a handler receives a
typed object, and a payload that does not decode goes to ``on_reject`` instead of
raising inside paho's network thread.

Handlers run on paho's network thread: they must be quick, and hand heavy work (running
ONNX pieces) to a worker through a bounded queue.
"""

from __future__ import annotations

import dataclasses
import socket
import ssl
import threading
import time
import typing
import urllib.parse
from collections.abc import Callable
from typing import Any

import paho.mqtt.client as paho
import structlog

from linguamq.schemas import blobs, envelope, requests
from linguamq.schemas.errors import SchemaError
from linguamq.schemas.requests import ErrorCode, ErrorReport
from linguamq.schemas.wire import Message
from linguamq.topics.errors import TopicError
from linguamq.topics.namespace import ERRORS, Topic

log = structlog.get_logger()

Handler = Callable[[str, Any, bool], None]  # (topic, decoded payload, retained)
Rejecter = Callable[[str, bytes, Exception], None]


class MqttError(RuntimeError):
    """Could not connect, subscribe or publish."""


class PayloadTooLarge(MqttError):
    """A payload over the client's ``max_payload``: refused before sending (the broker would
    close the connection of an oversized PUBLISH, losing everything queued on it)."""


class MqttTimeout(MqttError):
    """A network wait ran out of time."""


class MqttNotAuthorized(MqttError):
    """The broker refused our login (CONNACK 4 or 5): retrying with the same credentials cannot help."""


@dataclasses.dataclass(frozen=True)
class BrokerUrl:
    host: str
    port: int
    tls: bool = False
    username: str | None = None
    password: str | None = None

    @classmethod
    def parse(cls, url: str) -> BrokerUrl:
        """``mqtt://[user[:pass]@]host[:port]`` or ``mqtts://...`` (default ports 1883/8883)."""
        parts = urllib.parse.urlsplit(url if "://" in url else f"mqtt://{url}")
        if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parts.hostname:
            raise MqttError(f"broker URL {url!r}: expected mqtt://host[:port] or mqtts://host[:port]")
        tls = parts.scheme in ("mqtts", "ssl")
        try:
            port = parts.port or (8883 if tls else 1883)
        except ValueError as exc:
            raise MqttError(f"broker URL {url!r}: {exc}") from None
        unquote = urllib.parse.unquote
        return cls(parts.hostname, port, tls, unquote(parts.username) if parts.username else None,
                   unquote(parts.password) if parts.password else None)


@dataclasses.dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


MAX_PAYLOAD = 64 * 2**20  # the embedded broker's default max_payload (broker.DEFAULT_MAX_PAYLOAD)

_DECODERS: dict[str, Callable[[bytes], Any]] = {
    "envelope": envelope.decode, "blob_chunk": blobs.decode_chunk, "responses": requests.decode_response,
    "bytes": bytes}


def decoder_for(topic: Topic) -> Callable[[bytes], Any]:
    """Bytes -> typed object for ``topic``'s payload (SchemaError if it does not decode)."""
    if isinstance(topic.payload, str):
        return _DECODERS[topic.payload]
    return topic.payload.from_json


class MqttClient:
    """One MQTT connection. ``start()`` connects (bounded wait), ``stop()`` disconnects."""

    def __init__(self, *, url: str, client_id: str, will: Will | None = None, keepalive: int = 15,
                 cafile: str | None = None, insecure: bool = False, max_queued: int = 10_000,
                 max_payload: int = MAX_PAYLOAD, username: str | None = None,
                 password: str | None = None) -> None:
        # ``username``/``password`` override those of the URL (mqtt://user:pass@host);
        # ``cafile``: the CA that signed an mqtts:// broker's certificate (None: the system's).
        self.url = BrokerUrl.parse(url)
        if username is not None:
            self.url = dataclasses.replace(self.url, username=username,
                                           password=password if password is not None else self.url.password)
        self._refused: str | None = None  # the CONNACK refusal of the last attempt
        self._settled = threading.Event()  # the last attempt got a CONNACK, accepted or not
        self.max_payload = max_payload  # larger payloads are neither sent nor decoded
        self.rejected = 0  # payloads that did not decode (or were over max_payload), since start
        self.default_reject: Rejecter | None = None  # for subscriptions made without on_reject
        self.client_id = client_id
        self._subs: dict[str, tuple[int, Callable[[paho.MQTTMessage], None]]] = {}
        self._acks: dict[int, threading.Event] = {}  # SUBACKs waited for, by message id
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._reconnect_listeners: list[Callable[[], None]] = []
        self.connects = 0  # successful CONNECTs; more than one: the broker was lost and found again
        self._keepalive = keepalive
        self._client = _DirectWriteClient(paho.CallbackAPIVersion.VERSION2, client_id=client_id,
                                          protocol=paho.MQTTv311, clean_session=True)
        self._client.max_queued_messages_set(max_queued)
        self._client.max_inflight_messages_set(100)
        self._client.reconnect_delay_set(min_delay=1, max_delay=4)
        if self.url.username is not None:
            self._client.username_pw_set(self.url.username, self.url.password)
        self._tls: _TrackedContext | None = None
        if self.url.tls:
            self._tls = _TrackedContext(ssl.PROTOCOL_TLS_CLIENT)
            if insecure:
                self._tls.check_hostname, self._tls.verify_mode = False, ssl.CERT_NONE
            elif cafile:
                self._tls.load_verify_locations(cafile)
            else:
                self._tls.load_default_certs()
            self._client.tls_set_context(self._tls)
            self._client.tls_insecure_set(insecure)
        if will is not None:
            self._client.will_set(will.topic, will.payload, qos=will.qos, retain=will.retain)
        self._client.on_socket_open = _no_delay
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe

    # --- lifecycle ------------------------------------------------------------------

    def start(self, timeout: float = 10.0, *, wait_for_broker: bool = True) -> MqttClient:
        """Connect; MqttError at once for a refused login or a TLS failure (retrying cannot
        help), MqttTimeout if the broker cannot be reached within ``timeout``.

        ``wait_for_broker``: a broker not up yet is retried until ``timeout`` (a node or hub
        started beside its broker). False: a first attempt that finds nothing listening is
        an MqttError at once (a client whose user asked for this broker now)."""
        where = f"{self.url.host}:{self.url.port}"
        try:  # a first attempt in this thread, so that a TLS error surfaces as itself
            self._client.connect(self.url.host, self.url.port, keepalive=self._keepalive)
        except ssl.SSLError as exc:
            if self._tls is not None:
                self._tls.close_last()  # paho leaves the socket of a failed handshake open
            raise MqttError(f"TLS with {where} failed: {exc.reason or exc} (is --cafile the CA that signed the "
                            f"broker's certificate, and does the certificate name {self.url.host}?)") from exc
        except (OSError, ValueError) as first:  # not up yet: paho's loop retries until the timeout
            if isinstance(first, ConnectionRefusedError) and not wait_for_broker:
                raise MqttError(f"cannot connect to {where}: connection refused (is the hub running?)") from first
            try:
                self._client.connect_async(self.url.host, self.url.port, keepalive=self._keepalive)
            except (OSError, ValueError) as exc:
                raise MqttError(f"cannot connect to {where}: {exc}") from exc
        self._client.loop_start()
        deadline = time.monotonic() + timeout
        while not self._connected.is_set():
            if self._settled.wait(max(0.0, min(0.05, deadline - time.monotonic()))) and self._refused:
                self._client.loop_stop()
                raise MqttNotAuthorized(f"{where} refused the connection ({self._refused}): "
                                "not authorized: check --username/--password")
            if time.monotonic() >= deadline:
                self._client.loop_stop()
                raise MqttTimeout(f"no connection to {where} within {timeout:.0f} s"
                                  + ("" if self.url.tls else " (a TLS-only broker? use mqtts://)"))
        return self

    def stop(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    def __enter__(self) -> MqttClient:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def on_network_thread(self) -> bool:
        """True in a handler: whatever waits there for the network (a SUBACK, a PUBACK, an
        answer) waits for this very thread, and keep-alives stop meanwhile."""
        return threading.current_thread() is self._client._thread

    def on_reconnect(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener`` (on the network thread: be quick) after each reconnect, once the
        subscriptions are re-sent. A clean session loses what the broker held (a restarted
        broker even its retained messages): whoever owns state there re-publishes it.
        Returns a function that removes the listener."""
        with self._lock:
            self._reconnect_listeners.append(listener)

        def remove() -> None:
            with self._lock:
                if listener in self._reconnect_listeners:
                    self._reconnect_listeners.remove(listener)
        return remove

    # --- subscribing ----------------------------------------------------------------

    def subscribe(self, topic: Topic, filter_: str, handler: Handler, *,
                  on_reject: Rejecter | None = None, qos: int | None = None, wait: float | None = None) -> None:
        """Deliver every message on ``filter_`` to ``handler`` decoded as ``topic``'s payload.

        ``wait``: block until the broker acknowledged the subscription (at most that many
        seconds), for callers that publish next and expect an answer on it."""
        decode = decoder_for(topic)

        def deliver(msg: paho.MQTTMessage) -> None:
            payload = typing.cast(bytes, msg.payload)  # paho reads bytes (its annotation adds bytearray)
            try:
                if len(payload) > self.max_payload:
                    raise SchemaError(f"payload of {len(payload)} bytes exceeds this client's limit of "
                                      f"{self.max_payload}")
                value = decode(payload)
            except SchemaError as exc:
                self.rejected += 1
                reject = on_reject or self.default_reject
                if reject is not None:
                    reject(msg.topic, payload, exc)
                else:
                    log.warning("rejected message", topic=msg.topic, error=str(exc))
                return
            handler(msg.topic, value, bool(msg.retain))

        self.subscribe_raw(filter_, deliver, qos=topic.qos if qos is None else qos, wait=wait)

    def subscribe_raw(self, filter_: str, deliver: Callable[[paho.MQTTMessage], None], *, qos: int = 0,
                      wait: float | None = None) -> None:
        with self._lock:
            self._subs[filter_] = (qos, deliver)
            if not self.connected:
                return  # subscribed on (re)connect
            acked = threading.Event()
            rc, mid = self._client.subscribe(filter_, qos)
            if rc != paho.MQTT_ERR_SUCCESS:
                raise MqttError(f"subscribe to {filter_} failed: {paho.error_string(rc)}")
            if mid is None:
                raise MqttError(f"subscribe to {filter_} failed: paho gave no message id")
            if wait is not None:
                self._acks[mid] = acked
        if wait is not None and not acked.wait(wait):
            self._acks.pop(mid, None)
            raise MqttTimeout(f"subscription to {filter_} not acknowledged within {wait} s")

    def unsubscribe(self, filter_: str) -> None:
        with self._lock:
            self._subs.pop(filter_, None)
        if self.connected:
            self._client.unsubscribe(filter_)

    # --- publishing -----------------------------------------------------------------

    def publish(self, topic: Topic, name: str, payload: Message | bytes, *, wait: float | None = None) -> None:
        """Publish on the concrete topic ``name`` with ``topic``'s QoS and retain flag."""
        data = payload.to_json() if isinstance(payload, Message) else payload
        self.publish_raw(name, data, qos=topic.qos, retain=topic.retain, wait=wait)

    def publish_raw(self, name: str, data: bytes, *, qos: int = 0, retain: bool = False,
                    wait: float | None = None) -> None:
        if len(data) > self.max_payload:
            raise PayloadTooLarge(f"publish to {name}: payload of {len(data)} bytes exceeds max_payload "
                                  f"{self.max_payload} (the broker would drop the connection)")
        info = self._client.publish(name, data, qos=qos, retain=retain)
        if info.rc not in (paho.MQTT_ERR_SUCCESS, paho.MQTT_ERR_NO_CONN):
            raise MqttError(f"publish to {name} failed: {paho.error_string(info.rc)}")
        if wait is not None:
            try:
                info.wait_for_publish(wait)
            except (RuntimeError, ValueError) as exc:
                raise MqttError(f"publish to {name} failed: {exc}") from exc
            if not info.is_published():
                raise MqttTimeout(f"publish to {name} not acknowledged within {wait} s")

    def report_error(self, cluster: str, *, reporter: str, to: str, topic: str, code: ErrorCode, message: str,
                     ref: str | None = None) -> None:
        """Publish an ErrorReport on `errors/{to}` (``to``: the sender if known, else the reporter)."""
        report = ErrorReport(reporter=reporter, topic=topic[:1024], code=code, message=message[:1024], ref=ref,
                             ts=time.time())
        self.publish(ERRORS, ERRORS.build(cluster, client=to), report)

    # --- paho callbacks (network thread) --------------------------------------------

    def _on_connect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._refused = str(reason)  # before logging: start() must see it whatever the log does
            self._settled.set()
            log.error("mqtt connect refused", client=self.client_id, reason=str(reason))
            return
        self._refused = None
        with self._lock:
            subs = [(f, qos) for f, (qos, _) in self._subs.items()]
        if subs:
            client.subscribe(subs)
        self._connected.set()
        log.info("mqtt connected", client=self.client_id, broker=f"{self.url.host}:{self.url.port}")
        with self._lock:
            self.connects += 1
            listeners = list(self._reconnect_listeners) if self.connects > 1 else []
        for listener in listeners:
            try:
                listener()
            except Exception:  # a listener bug must not kill the network thread
                log.exception("reconnect listener failed", client=self.client_id)

    def _on_subscribe(self, client: paho.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        with self._lock:
            acked = self._acks.pop(mid, None)
        if acked is not None:
            acked.set()

    def _on_disconnect(self, client: paho.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._connected.clear()
        log.info("mqtt disconnected", client=self.client_id, reason=str(reason))

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        with self._lock:
            targets = [deliver for f, (_, deliver) in self._subs.items() if paho.topic_matches_sub(f, msg.topic)]
        for deliver in targets:
            try:
                deliver(msg)
            except Exception:  # a handler bug must not kill the network thread
                log.exception("handler failed", topic=msg.topic, client=self.client_id)


class _DirectWriteClient(paho.Client):
    """paho with a publish written at once, by the thread that makes it.

    Threaded paho (``loop_start``) writes a packet only from its network thread, and only
    between reads: a packet queued on another thread waits until the network thread wakes
    (a byte on a socket pair), selects and takes the GIL; one queued by a handler waits
    until the handler returns. On a node that is a thread switch per activation, on the
    head the text work of a token before its next step: both on the critical path of
    every token (`linguamq bench pipeline`, BENCHMARKS.md). Here the queuing thread writes
    the packet itself; every write (the network thread's too) holds one lock, so packets
    never interleave on the socket. Over TLS only the network thread does (an SSL socket
    must not be read and written by two threads at once). DISCONNECT (its write closes
    the socket) and any packet before the connection is up take paho's own path. This
    relies on paho 2.x internals (pinned below 3 in pyproject.toml).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._write_lock = threading.Lock()

    def loop_write(self) -> paho.MQTTErrorCode:
        with self._write_lock:
            return super().loop_write()

    def disconnect(self, *args: Any, **kwargs: Any) -> paho.MQTTErrorCode:
        """Under the write lock: a direct write sees the connection up with no DISCONNECT
        queued, or not up at all. A handler's publish that drained a DISCONNECT queued by
        another thread ran paho's on_disconnect inside the message callback, whose lock the
        network thread already held: it deadlocked, and stop() waited for it for ever."""
        with self._write_lock:
            return super().disconnect(*args, **kwargs)

    def _packet_queue(self, command: int, packet: bytes | bytearray, mid: int, qos: int,
                      info: paho.MQTTMessageInfo | None = None) -> paho.MQTTErrorCode:
        rc = super()._packet_queue(command, packet, mid, qos, info)
        network_thread = threading.current_thread() is self._thread
        if ((command & 0xF0) != paho.DISCONNECT and self._thread is not None and (network_thread or not self._ssl)
                and self._write_lock.acquire(blocking=False)):
            try:  # errors and partial writes are left to the network thread, which was woken too
                if self._state == paho._ConnectionState.MQTT_CS_CONNECTED:  # checked under the lock
                    self._packet_write()
            finally:
                self._write_lock.release()
        return rc


class _TrackedContext(ssl.SSLContext):
    """An SSL context that remembers the last socket it wrapped, so that the socket of a failed
    handshake (which paho drops without closing) can be closed."""

    last: ssl.SSLSocket | None = None

    def wrap_socket(self, *args: Any, **kwargs: Any) -> ssl.SSLSocket:
        self.last = super().wrap_socket(*args, **kwargs)
        return self.last

    def close_last(self) -> None:
        sock, self.last = self.last, None
        if sock is not None:
            sock.close()


def _no_delay(client: paho.Client, userdata: Any, sock: Any) -> None:
    # paho leaves Nagle on: a small activation would wait up to 40 ms for a delayed ACK.
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except (OSError, AttributeError):  # not a TCP socket (unix, websockets)
        pass


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, interval: float = 0.01) -> None:
    """Poll ``predicate`` until true; MqttTimeout naming ``what`` otherwise."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise MqttTimeout(f"timed out after {timeout:.1f} s waiting for {what}")
        time.sleep(interval)


__all__ = ["MAX_PAYLOAD", "BrokerUrl", "MqttClient", "MqttError", "MqttTimeout", "PayloadTooLarge", "Will", "TopicError", "decoder_for", "wait_for"]
