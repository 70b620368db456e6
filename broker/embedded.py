"""The hub's MQTT broker: amqtt, in-process, tuned for activation traffic.

``EmbeddedBroker`` runs on the caller's event loop (``async with``); ``BrokerThread`` gives
it a thread and a loop of its own for synchronous code (the hub command, tests).
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Self, TypeVar

import structlog

from linguamq.broker.amqtt_fixes import MAX_STRING_READ, FixedBroker
from linguamq.broker.errors import (
    BrokerConfigError,
    BrokerError,
    BrokerNotRunningError,
    BrokerStartError,
    BrokerTimeoutError,
)
from linguamq.broker.policy import Authenticate, TopicPolicy

DEFAULT_MAX_PAYLOAD = 64 * 2**20
MQTT_MAX_PAYLOAD = 268_435_455 - 2 - 65_535 - 2  # remaining length minus topic and packet id
# Only what must run: anonymous login. amqtt's defaults also load EventLoggerPlugin and
# PacketLoggerPlugin (two asyncio tasks per MQTT packet, whatever the log level) and
# BrokerSysPlugin (counts every packet, publishes $SYS/... every 20 s, pulls in psutil and
# warns about it). Without an auth plugin amqtt refuses every CONNECT (broker.py:822-824).
PLUGINS = {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}}

T = TypeVar("T")
DEFAULT_TLS_PORT = 8883
DEFAULT_MAX_INFLIGHT_MESSAGES = 20  # QoS 1/2 messages sent to a client and not yet acknowledged (mosquitto's)
DEFAULT_MAX_QUEUED_MESSAGES = 1000  # waiting behind those, or for a client that is away (mosquitto's)
DEFAULT_MAX_QUEUED_BYTES = 256 * 2**20  # the same in bytes (mosquitto: no limit, 0); 0 = no limit
DEFAULT_SESSION_EXPIRY_S = 3600.0  # a persistent session whose client stays away this long ends


@dataclasses.dataclass(frozen=True)
class BrokerStats:
    """What the broker holds for clients, and what it had to let go (``EmbeddedBroker.stats``)."""

    sessions: int  # connected clients and persistent sessions of clients away
    queued: int  # messages waiting: for clients that are away, or behind a full in-flight window
    sending: int  # messages handed to connections, not yet written out (clients slow to read)
    queue_dropped: int  # messages a client never got: its queue was full, it did not read, its session expired
    sessions_expired: int  # persistent sessions ended because their client stayed away


@dataclasses.dataclass(frozen=True)
class TlsListener:
    """A TLS listener beside (or, ``only``, instead of) the plaintext one."""

    cert: str  # PEM server certificate (chain)
    key: str  # PEM private key
    port: int = DEFAULT_TLS_PORT  # 0: any free port
    only: bool = False  # no plaintext listener at all


class EmbeddedBroker:
    """An MQTT 3.1.1 broker on ``host:port`` (port 0: any free port, see ``port`` after start).

    ``may_read(client, topic)`` is asked before any message -- live, queued or retained --
    goes to a client; ``may_publish(client, topic)`` before a PUBLISH is accepted and for the
    will of a CONNECT. Both default to allowing everything (see ``linguamq.broker.policy``).
    ``authenticate(username, password)`` decides each CONNECT (None: anonymous clients are
    welcome); ``broker/acl.py`` and ``broker/users.py`` make all three from a users file.
    ``tls`` adds a TLS listener (``tls_port`` after start); with ``tls.only`` it is the only one.
    A PUBLISH whose payload exceeds ``max_payload`` bytes closes the sender's connection.
    A client has at most ``max_inflight_messages`` QoS 1/2 messages unacknowledged; up to
    ``max_queued_messages`` more wait behind them, or while a client with a persistent session
    (clean session = 0) is away, and up to as many QoS 0 messages wait to be written to a
    client that reads slowly; ``max_queued_bytes`` (0: none) bounds each of those in bytes too.
    Beyond either limit the newest are dropped. A persistent session ends once its client
    stays away ``session_expiry_s`` seconds. ``stats()`` counts both.
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0,
                 max_payload: int = DEFAULT_MAX_PAYLOAD, may_read: TopicPolicy | None = None,
                 may_publish: TopicPolicy | None = None, authenticate: Authenticate | None = None,
                 tls: TlsListener | None = None, connect_timeout: float = 10.0,
                 max_inflight_messages: int = DEFAULT_MAX_INFLIGHT_MESSAGES,
                 max_queued_messages: int = DEFAULT_MAX_QUEUED_MESSAGES,
                 max_queued_bytes: int = DEFAULT_MAX_QUEUED_BYTES,
                 session_expiry_s: float = DEFAULT_SESSION_EXPIRY_S, start_timeout: float = 10.0,
                 stop_timeout: float = 15.0) -> None:
        _check(bool(host) and isinstance(host, str) and ":" not in host,
               f"host must be an IPv4 address or a name, got {host!r}")
        _check(isinstance(port, int) and 0 <= port <= 65_535, f"port out of range: {port!r}")
        _check(MAX_STRING_READ < max_payload <= MQTT_MAX_PAYLOAD,
               f"max_payload must be in ({MAX_STRING_READ}, {MQTT_MAX_PAYLOAD}], got {max_payload}")
        _check(isinstance(max_inflight_messages, int) and 0 < max_inflight_messages < 65_536,
               f"max_inflight_messages must be in [1, 65535] (MQTT packet ids), got {max_inflight_messages!r}")
        _check(isinstance(max_queued_messages, int) and max_queued_messages > 0,
               f"max_queued_messages must be a positive integer, got {max_queued_messages!r}")
        _check(isinstance(max_queued_bytes, int) and max_queued_bytes >= 0,
               f"max_queued_bytes must be an integer >= 0 (0: no limit), got {max_queued_bytes!r}")
        for name, value in (("connect_timeout", connect_timeout), ("session_expiry_s", session_expiry_s),
                            ("start_timeout", start_timeout), ("stop_timeout", stop_timeout)):
            _check(value > 0, f"{name} must be positive, got {value}")
        if tls is not None:
            _check(isinstance(tls.port, int) and 0 <= tls.port <= 65_535, f"TLS port out of range: {tls.port!r}")
            _check(bool(tls.cert) and bool(tls.key), "TLS needs a certificate and a key file")
        self._bind = (host, port)
        self._tls = tls
        self._max_payload = max_payload
        self._policies = (may_read, may_publish)
        self._authenticate = authenticate
        self._timeouts = {"connect": connect_timeout, "start": start_timeout, "stop": stop_timeout}
        self._limits = (max_inflight_messages, max_queued_messages, max_queued_bytes)
        self._session_expiry = session_expiry_s
        self._counters = {"queue_dropped": 0, "sessions_expired": 0}  # of the last run, once stopped
        self._amqtt: FixedBroker | None = None
        self._address: tuple[str, int] | None = None  # of the plaintext listener (or the TLS one if only)
        self._tls_address: tuple[str, int] | None = None
        self._log = structlog.get_logger().bind(component="broker")

    # --- where it listens (after start) -------------------------------------------------

    @property
    def host(self) -> str:
        return self._bound()[0]

    @property
    def port(self) -> int:
        return self._bound()[1]

    @property
    def url(self) -> str:
        """The plaintext listener's URL, or the TLS one's (mqtts://) when it is the only one."""
        host, port = self._bound()
        return f"{'mqtts' if self._tls is not None and self._tls.only else 'mqtt'}://{_dial(host)}:{port}"

    @property
    def tls_port(self) -> int | None:
        self._bound()
        return self._tls_address[1] if self._tls_address is not None else None

    @property
    def tls_url(self) -> str | None:
        if self._tls_address is None:
            self._bound()
            return None
        host, port = self._tls_address
        return f"mqtts://{_dial(host)}:{port}"

    @property
    def running(self) -> bool:
        return self._amqtt is not None

    def stats(self) -> BrokerStats:
        """Sessions and queues now, drops and expiries since start (safe from any thread)."""
        broker = self._amqtt
        if broker is None:
            return BrokerStats(sessions=0, queued=0, sending=0, **self._counters)
        return BrokerStats(sessions=len(broker.sessions), queued=broker.queued_messages(),
                           sending=broker.sending_messages(), **broker.counters)

    def _bound(self) -> tuple[str, int]:
        if self._address is None:
            raise BrokerNotRunningError("the broker is not running: start() it first")
        return self._address

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        if self._amqtt is not None:
            raise BrokerError("the broker is already running")
        host, port = self._bind
        broker: FixedBroker | None = None
        try:
            broker = FixedBroker(self._config(), max_payload=self._max_payload,
                                 connect_timeout=self._timeouts["connect"],
                                 max_inflight=self._limits[0], max_queued=self._limits[1],
                                 max_queued_bytes=self._limits[2],
                                 session_expiry=self._session_expiry,
                                 may_read=self._policies[0], may_publish=self._policies[1],
                                 authenticate=self._authenticate)
            await asyncio.wait_for(broker.start(), self._timeouts["start"])
        except Exception as exc:  # amqtt wraps most causes in its BrokerError; not all
            if broker is not None:
                await broker.abandon()
            if isinstance(exc, TimeoutError):
                raise BrokerTimeoutError(
                    f"broker did not start within {self._timeouts['start']} s") from exc
            raise BrokerStartError(f"cannot start the broker on {host}:{port}: {exc}") from exc
        self._amqtt = broker
        self._address = broker.bound_address()
        if self._tls is not None:
            self._tls_address = broker.bound_address("default" if self._tls.only else "tls")
        self._log.info("broker.started", url=self.url, tls_url=self.tls_url, max_payload=self._max_payload,
                       users=self._authenticate is not None, max_inflight_messages=self._limits[0],
                       max_queued_messages=self._limits[1], max_queued_bytes=self._limits[2],
                       session_expiry_s=self._session_expiry)

    async def stop(self) -> None:
        """Disconnect every client and close the listener. Stopping a stopped broker is a no-op."""
        broker, self._amqtt = self._amqtt, None
        if broker is None:
            return
        url, self._address, self._tls_address = self.url, None, None
        self._counters = dict(broker.counters)
        try:
            await asyncio.wait_for(broker.shutdown(), self._timeouts["stop"])
        except TimeoutError as exc:
            raise BrokerTimeoutError(f"broker did not stop within {self._timeouts['stop']} s") from exc
        except Exception as exc:
            raise BrokerError(f"broker at {url} failed to stop cleanly: {exc}") from exc
        finally:
            await broker.abandon()
            await broker.close_connections(timeout=self._timeouts["stop"] / 3)
        self._log.info("broker.stopped", url=url)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.stop()

    def _config(self) -> dict[str, Any]:
        host, port = self._bind
        listeners: dict[str, dict[str, Any]] = {
            "default": {"type": "tcp", "bind": f"{host}:{port}", "max_connections": 0}}
        if self._tls is not None:
            tls = {"type": "tcp", "bind": f"{host}:{self._tls.port}", "max_connections": 0, "ssl": True,
                   "certfile": self._tls.cert, "keyfile": self._tls.key}
            listeners = {"default": tls} if self._tls.only else {**listeners, "tls": tls}
        return {
            "listeners": listeners,
            "plugins": dict(PLUGINS),
            # Keep-alive grace is applied by FixedBroker (1.5 x), not by amqtt's fixed delay.
            "timeout_disconnect_delay": 0,
        }


class BrokerThread:
    """An ``EmbeddedBroker`` on its own daemon thread and event loop, for synchronous code.

    ``with BrokerThread() as broker: connect(broker.host, broker.port)``
    """

    def __init__(self, *, broker: EmbeddedBroker | None = None, timeout: float = 30.0) -> None:
        self._broker = broker if broker is not None else EmbeddedBroker()
        self._timeout = timeout
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def broker(self) -> EmbeddedBroker:
        return self._broker

    @property
    def host(self) -> str:
        return self._broker.host

    @property
    def port(self) -> int:
        return self._broker.port

    @property
    def url(self) -> str:
        return self._broker.url

    @property
    def tls_port(self) -> int | None:
        return self._broker.tls_port

    @property
    def tls_url(self) -> str | None:
        return self._broker.tls_url

    def start(self) -> None:
        if self._thread is not None:
            raise BrokerError("the broker thread is already running")
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(target=self._run, name="lmq-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(self._timeout):
            raise BrokerTimeoutError(f"broker thread did not start within {self._timeout} s")
        if self._error is not None:
            self._thread.join(self._timeout)
            self._thread, error = None, self._error
            raise error

    def stop(self) -> None:
        """Stop the broker and join its thread; a no-op if it is not running."""
        thread, loop, stopping = self._thread, self._loop, self._stopping
        if thread is None:
            return
        if loop is not None and stopping is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stopping.set)
            except RuntimeError:  # the loop closed in between: the thread is ending anyway
                pass
        thread.join(self._timeout)
        if thread.is_alive():
            raise BrokerTimeoutError(f"broker thread did not stop within {self._timeout} s")
        self._thread = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def call(self, fn: Callable[[EmbeddedBroker], Awaitable[T]], *, timeout: float = 10.0) -> T:
        """Run ``await fn(broker)`` on the broker's loop and return its result."""
        loop = self._loop
        if self._thread is None or loop is None:
            raise BrokerNotRunningError("the broker thread is not running")
        future = asyncio.run_coroutine_threadsafe(_call(fn, self._broker), loop)
        try:
            return future.result(timeout)
        except TimeoutError as exc:
            future.cancel()
            raise BrokerTimeoutError(f"call on the broker loop took over {timeout} s") from exc

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def _run(self) -> None:
        try:
            with asyncio.Runner(loop_factory=_loop_factory()) as runner:
                runner.run(self._serve())
        except BaseException as exc:  # noqa: BLE001 - handed to the thread that called start/stop
            self._error = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        await self._broker.start()
        self._ready.set()
        try:
            await self._stopping.wait()
        finally:
            await self._broker.stop()


def _dial(host: str) -> str:
    """The address a local client dials for a listener bound to ``host`` (any-address: loopback)."""
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


async def _call(fn: Callable[[EmbeddedBroker], Awaitable[T]], broker: EmbeddedBroker) -> T:
    return await fn(broker)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise BrokerConfigError(message)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (the hub extra, on Linux and macOS): it cuts
    the broker's time per hop by ~7% at 8 KiB (`linguamq bench transport`, BENCHMARKS.md);
    else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop
