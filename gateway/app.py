"""The gateway's HTTP server: OpenAI's endpoints, the dashboard and its event stream.

Starlette on uvicorn. Each completion is one cluster request followed on a thread of its own
(``follow`` blocks on MQTT), its pieces handed to the event loop through a queue; a client
that goes away mid-answer has its request cancelled, which frees its KV cache on the nodes.

Who may call: on an open cluster (the gateway's own login has no user name) anyone who can
reach the port; on a secured one an ``Authorization: Bearer KEY`` (or ``?key=`` for the
dashboard's event stream, which browsers cannot give headers) holding a user's login
(gateway/keys.py): the request then goes out on that user's own connection.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, Literal

import structlog
import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from linguamq.client import addressing, cancel, follow, new_request_id
from linguamq.gateway import protocol
from linguamq.gateway.keys import BadKey, parse_api_key
from linguamq.gateway.protocol import ApiError, Call, Shape
from linguamq.gateway.settings import GatewaySettings, is_loopback
from linguamq.gateway.view import ClusterView
from linguamq.schemas.requests import GenerateRequest, GenerateResult
from linguamq.topics.client import MqttClient, MqttError, MqttNotAuthorized, MqttTimeout

log = structlog.get_logger()
STATIC = Path(__file__).parent / "static"
MAX_BODY_BYTES = 1 << 20  # a request body larger than this is refused (413) before it is read whole
REFUSED_KEY_S = 10.0  # a key the broker refused is refused here for this long (no broker login per try)
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]
DISCONNECT_CHECK_S = 0.5  # how often a caller waiting for a whole answer is checked for having left
CONNECTIONS_MAX = 256  # users' connections kept open (least recently used closed beyond)


class Gateway:
    def __init__(self, settings: GatewaySettings, *, allowed_hosts: list[str] | None = None) -> None:
        """``allowed_hosts``: the Host headers answered (a server on loopback answers only
        loopback names: a web page that rebinds its DNS name to 127.0.0.1 reads nothing)."""
        self.settings = settings
        self.view = ClusterView(settings.cluster)
        self._own: MqttClient | None = None
        self._users: collections.OrderedDict[str, MqttClient] = collections.OrderedDict()  # by key digest
        self._users_lock = threading.Lock()  # the map; connecting holds a key's own lock
        self._connecting: dict[str, threading.Lock] = {}
        self._refused: dict[str, float] = {}  # key digest -> when the broker refused it
        self.app = Starlette(routes=[
            Route("/v1/models", self.models),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/api/state", self.state),
            Route("/api/events", self.events),
            Route("/health", self.health),
            Route("/", self.index),
            Mount("/static", StaticFiles(directory=STATIC), name="static"),
        ], middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts or ["*"])],
            exception_handlers={ApiError: _api_error, HTTPException: _http_error, Exception: _internal_error})

    # --- lifecycle -----------------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> Gateway:
        """Connect and follow the cluster; MqttError if the broker refuses or cannot be reached."""
        s = self.settings
        self._own = MqttClient(url=s.broker_url, client_id=f"api-{new_request_id()[1:9]}", username=s.username,
                               password=s.password, cafile=s.cafile).start(timeout, wait_for_broker=False)
        self.view.follow(self._own)
        return self

    def stop(self) -> None:
        with self._users_lock:
            clients, self._users = list(self._users.values()), collections.OrderedDict()
        for client in clients + ([self._own] if self._own else []):
            client.stop()

    # --- who is calling ------------------------------------------------------------------

    async def _connection(self, request: Request, *, key_in_query: bool = False) -> MqttClient:
        """The connection a request goes out on: ours on an open cluster, else the key's user's.
        ``key_in_query``: ``?key=`` also counts (the dashboard's EventSource cannot send headers)."""
        if not self.settings.keys_required:
            assert self._own is not None
            return self._own
        key = _bearer(request) or (request.query_params.get("key") if key_in_query else None)
        if key is None:
            raise ApiError(401, "an API key is required: Authorization: Bearer KEY (`linguamq users add NAME "
                           "--role client` prints one)", type="invalid_request_error", code="invalid_api_key")
        try:
            name, password = parse_api_key(key)
        except BadKey as exc:
            raise ApiError(401, f"invalid API key: {exc}", code="invalid_api_key") from None
        return await asyncio.to_thread(self._user_connection, name, password)

    def _user_connection(self, name: str, password: str) -> MqttClient:
        """The key's own connection: made on its first call, kept (LRU) while it stays logged in."""
        digest = hashlib.sha256(f"{name}:{password}".encode()).hexdigest()
        with self._users_lock:
            if time.monotonic() - self._refused.get(digest, -REFUSED_KEY_S) < REFUSED_KEY_S:
                raise ApiError(401, "invalid API key: the cluster refused its login", code="invalid_api_key")
            lock = self._connecting.setdefault(digest, threading.Lock())
        with lock:  # one connection per key, however many callers; other keys are not held up
            with self._users_lock:
                client = self._users.get(digest)
                if client is not None and client.connected:
                    self._users.move_to_end(digest)
                    return client
                stale = self._users.pop(digest, None)  # lost its login (a changed password): log in again
            if stale is not None:
                stale.stop()
            client = self._login(name, password, digest)
            with self._users_lock:
                self._users[digest] = client
                self._connecting.pop(digest, None)
                old = self._users.popitem(last=False)[1] if len(self._users) > CONNECTIONS_MAX else None
        if old is not None:
            old.stop()
        return client

    def _login(self, name: str, password: str, digest: str) -> MqttClient:
        s = self.settings
        try:
            return MqttClient(url=s.broker_url, client_id=f"api-{name}-{new_request_id()[1:7]}", username=name,
                              password=password, cafile=s.cafile).start(10.0, wait_for_broker=False)
        except MqttNotAuthorized:
            with self._users_lock:
                if len(self._refused) > 10_000:  # bounded: a stream of invented keys
                    self._refused.clear()
                self._refused[digest] = time.monotonic()
            raise ApiError(401, "invalid API key: the cluster refused its login", code="invalid_api_key") from None
        except MqttError as exc:
            raise ApiError(503, f"cannot reach the cluster's broker: {exc}", type="server_error") from None

    # --- OpenAI endpoints ----------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        await self._connection(request)
        model = self.view.model
        data = [] if model is None else [{"id": model.name, "object": "model", "created": 0, "owned_by": "linguamq"}]
        return JSONResponse({"object": "list", "data": data})

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, "chat")

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, "text")

    async def _complete(self, request: Request, kind: Literal["chat", "text"]) -> Response:
        mqtt = await self._connection(request)
        body = await _json_body(request)
        model = self.view.model
        call = protocol.parse(kind, body, request_id=new_request_id())
        shape = Shape(call, model.name if model else "")
        run = _Run(mqtt, self.settings.cluster, call.request, self.settings.timeout)
        if not call.stream:
            result = await run.first(request, whole=True)
            assert isinstance(result, GenerateResult)
            if result.stop_reason == "error":
                raise protocol.result_error(result)
            return JSONResponse(shape.whole(result))
        first = await run.first(request, whole=False)  # before the headers: a refusal is still an HTTP status
        if isinstance(first, GenerateResult) and first.stop_reason == "error":
            raise protocol.result_error(first)
        return StreamingResponse(_sse(run, shape, call, first), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    # --- the dashboard -------------------------------------------------------------------

    async def index(self, _request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def state(self, request: Request) -> Response:
        await self._connection(request, key_in_query=True)  # the same keys as the API
        return JSONResponse(self.view.snapshot())

    async def events(self, request: Request) -> Response:
        await self._connection(request, key_in_query=True)  # the same keys as the API

        async def stream() -> AsyncIterator[str]:
            async for snapshot in self.view.changes():
                yield f"event: state\ndata: {json.dumps(snapshot)}\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def health(self, _request: Request) -> Response:
        plan = self.view.plan
        return JSONResponse({"status": "ok", "model": self.view.model.name if self.view.model else None,
                             "plan_epoch": plan.epoch if plan else None, "stages": len(plan.stages) if plan else 0})



async def _json_body(request: Request) -> Any:
    """The body as JSON, read up to MAX_BODY_BYTES; ApiError 400/413 otherwise."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes", code="request_too_large")
    data = bytearray()
    try:
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY_BYTES:
                raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes", code="request_too_large")
    except ClientDisconnect:
        raise ApiError(499, "the client closed the request") from None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, or nested beyond the parser's depth
        raise protocol.bad("the request body is not JSON") from None


async def _api_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return JSONResponse(exc.body(), status_code=exc.status)


async def _http_error(_request: Request, exc: Exception) -> Response:
    """Starlette's own (404 no such path, 405 wrong method) in OpenAI's error shape."""
    assert isinstance(exc, HTTPException)
    return JSONResponse(ApiError(exc.status_code, str(exc.detail)).body(), status_code=exc.status_code)


async def _internal_error(_request: Request, exc: Exception) -> Response:
    log.exception("http request failed", exc_info=exc)
    return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}", type="server_error").body(),
                        status_code=500)


def _bearer(request: Request) -> str | None:
    value = request.headers.get("authorization", "")
    scheme, _, key = value.partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


async def _sse(run: _Run, shape: Shape, call: Call, first: str | GenerateResult) -> AsyncIterator[str]:
    """A streamed answer as server-sent events, ``[DONE]`` at the end."""

    def event(obj: dict[str, Any]) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    item: str | GenerateResult = first
    try:
        yield event(shape.chunk(item if isinstance(item, str) else "", first=True))
        while not isinstance(item, GenerateResult):
            try:
                item = await run.next()
            except ApiError as exc:  # no answer in time, the broker lost: said in the stream, then the end
                yield event(exc.body())
                yield "data: [DONE]\n\n"
                return
            if isinstance(item, str):
                yield event(shape.chunk(item))
        if item.stop_reason == "error":
            yield event(protocol.result_error(item).body())
        else:
            yield event(shape.final(item))
            if call.include_usage:
                yield event(shape.usage_chunk(item))
        yield "data: [DONE]\n\n"
    finally:
        run.cancel_unless_done()  # the caller left (or the stream broke): free the nodes


class _Run:
    """One request through the cluster: ``follow`` on a thread of its own, its pieces and
    result (or failure) handed to the event loop."""

    def __init__(self, mqtt: MqttClient, cluster: str, request: GenerateRequest, timeout: float) -> None:
        self._mqtt, self._cluster = mqtt, cluster
        self._sent = addressing(mqtt, cluster, request.seeded())[0]  # as follow sends it: what cancel names
        self._loop = asyncio.get_running_loop()
        self._inbox: asyncio.Queue[str | GenerateResult | BaseException] = asyncio.Queue()
        self.done = False
        threading.Thread(target=self._follow, args=(self._sent, timeout), daemon=True,
                         name=f"api-{request.id}").start()

    def _follow(self, request: GenerateRequest, timeout: float) -> None:
        item: str | GenerateResult | BaseException
        try:
            events = follow(self._mqtt, self._cluster, request, timeout=timeout)
            while True:
                try:
                    self._hand(next(events))
                except StopIteration as end:
                    item = end.value
                    break
        except MqttTimeout as exc:
            item = ApiError(504, str(exc), type="server_error", code="timeout")
        except MqttError as exc:
            item = ApiError(503, f"the cluster's broker: {exc}", type="server_error")
        except Exception as exc:  # never leave the caller waiting
            log.exception("api request failed", request=request.id)
            item = ApiError(500, f"internal error: {exc}", type="server_error")
        self._hand(item)

    def _hand(self, item: str | GenerateResult | BaseException) -> None:
        try:
            self._loop.call_soon_threadsafe(self._inbox.put_nowait, item)
        except RuntimeError:  # the server's loop has closed
            pass

    async def next(self) -> str | GenerateResult:
        item = await self._inbox.get()
        if isinstance(item, BaseException):
            self.done = True
            raise item
        if isinstance(item, GenerateResult):
            self.done = True
        return item

    async def first(self, request: Request, *, whole: bool) -> str | GenerateResult:
        """The first piece (or the result if it comes first), or with ``whole`` the result.
        A caller that disconnects meanwhile (a long prefill, a long answer) cancels the request."""
        settled = False
        check_at = time.monotonic() + DISCONNECT_CHECK_S
        try:
            while True:
                try:
                    item = await asyncio.wait_for(self.next(), DISCONNECT_CHECK_S)
                except TimeoutError:
                    item = None
                if isinstance(item, GenerateResult) or (item is not None and not whole):
                    settled = True
                    return item
                if time.monotonic() >= check_at:  # pieces may arrive without a pause: check by the clock
                    check_at = time.monotonic() + DISCONNECT_CHECK_S
                    if await request.is_disconnected():
                        raise ApiError(499, "the client closed the request")
        finally:
            if not settled:
                self.cancel_unless_done()

    def cancel_unless_done(self) -> None:
        """Cancel on a thread (this may run in a cancelled task, where nothing can be awaited)."""
        if not self.done:
            self.done = True
            threading.Thread(target=self._cancel, daemon=True).start()

    def _cancel(self) -> None:
        try:
            cancel(self._mqtt, self._cluster, self._sent)
        except MqttError as exc:
            log.warning("cancel not sent", request=self._sent.id, error=str(exc))


class GatewayServer:
    """The gateway served by uvicorn on a thread (``linguamq serve``, ``hub --http``, tests)."""

    def __init__(self, settings: GatewaySettings, *, host: str = "127.0.0.1", port: int = 8000) -> None:
        self.gateway = Gateway(settings, allowed_hosts=LOOPBACK_HOSTS if is_loopback(host) else None)
        self._config = uvicorn.Config(self.gateway.app, host=host, port=port, log_level="warning", lifespan="off",
                                      timeout_graceful_shutdown=2)
        self._server = uvicorn.Server(self._config)
        self._thread: threading.Thread | None = None
        self.url = ""

    def start(self, timeout: float = 10.0) -> GatewayServer:
        self.gateway.start()
        self._thread = threading.Thread(target=self._server.run, daemon=True, name="http")
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.gateway.stop()
                raise OSError(f"the HTTP server did not start on {self._config.host}:{self._config.port} "
                              "(is the port in use?)")
            time.sleep(0.02)
        host, port = self._server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        log.info("http gateway started", url=self.url)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.gateway.stop()

    def __enter__(self) -> GatewayServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

