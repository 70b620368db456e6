"""The public Python API: generate text through a running linguamq cluster.

    import linguamq

    with linguamq.Client("mqtt://127.0.0.1:1883", cluster="home") as client:
        for piece in client.stream("Tell me a story", max_tokens=32):
            print(piece, end="", flush=True)
        result = client.generate("Hello", max_tokens=8)   # a Result: text, tokens, stop_reason...

``AsyncClient`` is the asyncio twin (``async with``, ``await generate``, ``async for`` over
``stream``). Errors are those of ``linguamq.errors``. A secured cluster: pass
``username``/``password`` (a client-role user) and, for ``mqtts://``, ``cafile``.

Underneath is ``generate_remote`` (also used by the benches and chaos cases with a
connection of their own). A request survives a lost broker (a hub restart): once the
client has reconnected, the request is published again, and again every few seconds
until an answer comes (the new hub's head may not be listening yet). Generation is
deterministic per (seed, step) and a request without a seed gets one here, before it is
first sent, so the new head's stream repeats what the old one sent:
events already passed on are skipped, by their (token index, piece) order. A head that
still runs the request only reports the copy on `errors/`.

A request left before its end (a Stream closed, a ``with`` left, Ctrl-C) is cancelled: the
head stops it within a step and the nodes free its KV cache.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping, Sequence
from typing import Any, Self

import structlog

from linguamq import topics
from linguamq.errors import ConnectionFailed, GenerationError, NotAuthorized, RequestError, Timeout
from linguamq.schemas.errors import SchemaError
from linguamq.schemas.requests import CancelRequest, ChatMessage, GenerateRequest, GenerateResult, Sampling, TokenEvent
from linguamq.topics.client import MqttClient, MqttError, MqttNotAuthorized, MqttTimeout

Messages = Sequence[ChatMessage | Mapping[str, str]]  # [{"role": "user", "content": "Hi"}, ...]
Result = GenerateResult  # text, tokens, prompt_tokens, ttft_ms, ms_per_token, stop_reason, error
RESEND_S = 5.0  # after a reconnect, publish the request again this often until something arrives
CANCEL_WAIT_S = 2.0  # a cancel waits this long for the broker's acknowledgement (Ctrl-C must not hang)
DEFAULT_URL = "mqtt://127.0.0.1:1883"


# --- the client ------------------------------------------------------------------------


class Client:
    """A connection to a cluster's broker that generates text. Connects on ``with`` (or
    ``connect()``, or the first request); one request at a time per thread is the usual
    use, but requests from several threads may share it."""

    def __init__(self, broker_url: str = DEFAULT_URL, *, cluster: str = "home", username: str | None = None,
                 password: str | None = None, cafile: str | None = None, timeout: float = 120.0,
                 connect_timeout: float = 10.0) -> None:
        _log_through_stdlib_unless_configured()
        with _translated():
            topics.validate_id("cluster", cluster)
        self.broker_url, self.cluster, self.timeout = broker_url, cluster, timeout
        self._connect_timeout = connect_timeout
        self._username, self._password, self._cafile = username, password, cafile
        self._mqtt: MqttClient | None = None
        self._lock = threading.Lock()

    def connect(self) -> Self:
        with self._lock, _translated():
            if self._mqtt is None:
                mqtt = MqttClient(url=self.broker_url, client_id=f"gen-{new_request_id()[1:9]}",
                                  username=self._username, password=self._password, cafile=self._cafile)
                try:
                    # nothing listening is said at once: the user named this broker, now
                    self._mqtt = mqtt.start(self._connect_timeout, wait_for_broker=False)
                except MqttTimeout as exc:  # not the cluster's silence: the broker's
                    raise ConnectionFailed(str(exc)) from exc
        return self

    def close(self) -> None:
        with self._lock:
            mqtt, self._mqtt = self._mqtt, None
        if mqtt is not None:
            mqtt.stop()

    def __enter__(self) -> Self:
        return self.connect()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, prompt: str | None = None, *, messages: Messages = (), max_tokens: int = 64,
                 temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                 stop: tuple[str, ...] | list[str] = (), request_id: str | None = None) -> Result:
        """Generate and return the whole answer. GenerationError if the cluster failed it."""
        stream = self.stream(prompt, messages=messages, max_tokens=max_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, seed=seed, stop=stop, request_id=request_id)
        with stream:
            for _ in stream:
                pass
        assert stream.result is not None  # a finished stream always holds its result
        return stream.result

    def stream(self, prompt: str | None = None, *, messages: Messages = (), max_tokens: int = 64,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               stop: tuple[str, ...] | list[str] = (), request_id: str | None = None) -> Stream:
        """Generate, yielding the text as it is produced; ``stream.result`` holds the whole
        answer once the iteration ends (GenerationError at the end if the cluster failed it).
        Give the prompt text, or ``messages`` (a chat: the hub renders it with the model's
        chat template), not both."""
        request = _request(prompt, messages, max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                           seed=seed, stop=stop, request_id=request_id)
        mqtt = self.connect()._mqtt
        assert mqtt is not None
        request = dataclasses.replace(request, client=mqtt.client_id)  # errors about it: errors/{client id}
        return Stream(follow(mqtt, self.cluster, request, timeout=self.timeout))


class Stream(Iterator[str]):
    """The text pieces of one request, as they arrive; ``result`` once it has ended.
    Closing it before the end (``close()``, leaving a ``with``) cancels the request."""

    def __init__(self, events: Generator[str, None, GenerateResult]) -> None:
        self._events = events
        self.result: Result | None = None

    def __iter__(self) -> Self:
        return self

    def __next__(self) -> str:
        if self.result is not None:
            raise StopIteration
        with _translated():
            try:
                return next(self._events)
            except StopIteration as end:
                self.result = end.value
        assert self.result is not None
        if self.result.stop_reason == "error":
            raise GenerationError(self.result)
        raise StopIteration

    def close(self) -> None:
        self._events.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the asyncio twin ------------------------------------------------------------------


class AsyncClient:
    """``Client`` for asyncio: the network work runs in worker threads (the MQTT client is
    threaded), so the event loop is never blocked."""

    def __init__(self, broker_url: str = DEFAULT_URL, **options: Any) -> None:
        self._client = Client(broker_url, **options)

    async def connect(self) -> Self:
        await asyncio.to_thread(self._client.connect)
        return self

    async def close(self) -> None:
        await asyncio.to_thread(self._client.close)

    async def __aenter__(self) -> Self:
        return await self.connect()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def generate(self, prompt: str | None = None, **options: Any) -> Result:
        """As ``Client.generate``."""
        return await asyncio.to_thread(self._client.generate, prompt, **options)

    def stream(self, prompt: str | None = None, **options: Any) -> AsyncStream:
        """As ``Client.stream``: ``async for piece in client.stream(...)``."""
        return AsyncStream(lambda: self._client.stream(prompt, **options))


class AsyncStream(AsyncIterator[str]):
    _END = object()

    def __init__(self, open_stream: Callable[[], Stream]) -> None:
        self._open = open_stream
        self._stream: Stream | None = None
        self._pending: asyncio.Future[Any] | None = None  # a next() running in a worker thread

    @property
    def result(self) -> Result | None:
        return None if self._stream is None else self._stream.result

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> str:
        if self._stream is None:
            self._stream = await asyncio.to_thread(self._open)
        self._pending = asyncio.ensure_future(asyncio.to_thread(next, self._stream, self._END))
        piece = await self._pending
        self._pending = None
        if piece is self._END:
            raise StopAsyncIteration
        return str(piece)

    async def aclose(self) -> None:
        if self._pending is not None:  # a generator cannot be closed while a thread runs it
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await self._pending
        if self._stream is not None:
            await asyncio.to_thread(self._stream.close)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# --- requests over a connection of the caller's --------------------------------------------


def new_request_id() -> str:
    return f"r{uuid.uuid4().hex[:16]}"


def addressing(client: MqttClient, cluster: str, request: GenerateRequest) -> tuple[GenerateRequest, str, str]:
    """(request, topic to publish it on, topic of its responses).

    A client logged in as user U (a secured cluster) may publish only on `requests/U` and read
    only `responses/U/+`: the request goes there, with ``client`` = U. Without a username it
    goes on the open `requests` topic and is answered on `responses/{id}`."""
    user = _user(client)
    if user is None:
        return request, topics.REQUESTS.build(cluster), topics.response_topic(cluster, request.id)
    return (dataclasses.replace(request, client=user), topics.REQUESTS_FROM.build(cluster, client=user),
            topics.response_topic(cluster, request.id, user))


def cancel(client: MqttClient, cluster: str, request: GenerateRequest, *, wait: float = CANCEL_WAIT_S) -> None:
    """Ask the head to stop ``request`` (as ``addressing`` sent it): no step after this one, the
    nodes free its KV, its result says `cancelled`. On `cancel/U` for user U, else `cancel`."""
    user = _user(client)
    topic = topics.CANCEL.build(cluster) if user is None else topics.CANCEL_FROM.build(cluster, client=user)
    client.publish(topics.CANCEL, topic, CancelRequest(id=request.id, client=request.client), wait=wait)


def _user(client: MqttClient) -> str | None:
    """The client's username if it can name its topics (a secured cluster), else None."""
    user = client.url.username
    return user if user is not None and topics.is_id("client", user) else None


def generate_remote(client: MqttClient, cluster: str, request: GenerateRequest, *,
                    on_text: Callable[[str], None] | None = None, timeout: float = 120.0,
                    on_resend: Callable[[], None] | None = None) -> GenerateResult:
    """Send ``request`` on ``client`` and return its final result, streaming text to ``on_text``.
    Raises MqttTimeout after ``timeout`` seconds without a response; ``on_resend`` is called
    each time the request is published again after a reconnect."""
    events = follow(client, cluster, request, timeout=timeout, on_resend=on_resend)
    while True:
        try:
            text = next(events)
        except StopIteration as end:
            return end.value
        if on_text is not None:
            on_text(text)


def follow(client: MqttClient, cluster: str, request: GenerateRequest, *, timeout: float = 120.0,
           on_resend: Callable[[], None] | None = None) -> Generator[str, None, GenerateResult]:
    """Send ``request`` and yield its text pieces; returns (StopIteration.value) its result.

    Subscribes to the response topic before publishing, so no token is missed; leaving the
    generator before the result (closed, or an exception such as KeyboardInterrupt) cancels
    the request and unsubscribes."""
    inbox: queue.Queue[TokenEvent | GenerateResult] = queue.Queue()
    # The seed is fixed here, not by the head: a request re-sent to a new hub must replay the same stream.
    request, request_topic, name = addressing(client, cluster, request.seeded())

    def subscribe() -> None:
        client.subscribe(topics.RESPONSES, name, lambda _t, value, _r: inbox.put(value), wait=10.0)

    def send() -> None:
        client.publish(topics.REQUESTS, request_topic, request, wait=10.0)

    reconnected = threading.Event()
    subscribe()
    remove_listener = client.on_reconnect(reconnected.set)
    resume = _Resume()
    sent = ended = False
    try:
        send()
        sent = True
        last_event = time.monotonic()
        resend_at: float | None = None  # set after a reconnect, until the first event arrives
        while True:
            now = time.monotonic()
            if reconnected.is_set() or (resend_at is not None and now >= resend_at):
                reconnected.clear()
                resend_at = now + RESEND_S
                try:
                    subscribe()  # re-sent on reconnect already; this waits for its SUBACK
                    send()
                    resume.restart()
                    if on_resend is not None:
                        on_resend()
                except MqttError:  # lost again: the next reconnect or resend tries once more
                    pass
            try:
                event = inbox.get(timeout=0.1)
            except queue.Empty:
                if time.monotonic() - last_event > timeout:
                    raise MqttTimeout(f"request {request.id}: no response for {timeout:.0f} s "
                                      "(is a hub running on this cluster?)") from None
                continue
            last_event, resend_at = time.monotonic(), None
            if isinstance(event, GenerateResult):
                ended = True
                return event
            if resume.fresh(event):
                yield event.text
    finally:
        remove_listener()
        if sent and not ended:  # left early: the cluster would compute up to max_tokens for nobody
            with contextlib.suppress(MqttError):
                cancel(client, cluster, request)
        with contextlib.suppress(MqttError):
            client.unsubscribe(name)


class _Resume:
    """Which TokenEvents are new: a stream's events are ordered by (token index, piece of a
    long text); after a resend the new head's stream starts again from the first."""

    def __init__(self) -> None:
        self._delivered: tuple[int, int] = (-1, 0)  # the last key passed on
        self._prev_index: int | None = None
        self._piece = 0

    def restart(self) -> None:
        self._prev_index, self._piece = None, 0

    def fresh(self, event: TokenEvent) -> bool:
        self._piece = self._piece + 1 if event.index == self._prev_index else 0
        self._prev_index = event.index
        key = (event.index, self._piece)
        if key <= self._delivered:
            return False
        self._delivered = key
        return True


def _request(prompt: str | None, messages: Messages, *, max_tokens: int, temperature: float, top_k: int,
             top_p: float, seed: int | None, stop: tuple[str, ...] | list[str], request_id: str | None) -> GenerateRequest:
    with _translated():  # both or neither of prompt and messages: RequestError, from the schema's check
        sampling = Sampling(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        chat = tuple(m if isinstance(m, ChatMessage) else ChatMessage.from_dict(m) for m in messages)
        return GenerateRequest(id=request_id or new_request_id(), prompt=prompt, messages=chat,
                               max_tokens=max_tokens, sampling=sampling, stop=tuple(stop))


def _log_through_stdlib_unless_configured() -> None:
    """structlog unconfigured prints every line to stdout, which is the embedding program's:
    then route ours to the standard ``logging`` tree instead (loggers named by module, so
    ``logging.getLogger("linguamq")`` governs them; by default warnings and up reach stderr).
    An application that configured structlog keeps its own set-up."""
    if not structlog.is_configured():
        structlog.configure(processors=[structlog.stdlib.filter_by_level, structlog.dev.ConsoleRenderer(colors=False)],
                            logger_factory=structlog.stdlib.LoggerFactory(),
                            wrapper_class=structlog.stdlib.BoundLogger)


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """Our packages' errors as the API's (``raise ... from`` keeps the cause)."""
    try:
        yield
    except MqttNotAuthorized as exc:
        raise NotAuthorized(str(exc)) from exc
    except MqttTimeout as exc:
        raise Timeout(str(exc)) from exc
    except MqttError as exc:
        raise ConnectionFailed(str(exc)) from exc
    except (SchemaError, topics.TopicError) as exc:
        raise RequestError(str(exc)) from exc
