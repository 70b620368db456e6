"""Generate through a running cluster: publish a request, follow its responses.

A request survives a lost broker (a hub restart): once the client has reconnected, the
request is published again, and again every few seconds until an answer comes (the new
hub's head may not be listening yet). Generation is deterministic per (seed, step), so
the new head's stream repeats what the old one sent: events already passed on are
skipped, by their (token index, piece) order. A head that still runs the request only
reports the copy on `errors/`.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
import uuid
from collections.abc import Callable

from linguamq import topics
from linguamq.schemas.requests import GenerateRequest, GenerateResult, TokenEvent
from linguamq.topics.client import MqttClient, MqttError, MqttTimeout

RESEND_S = 5.0  # after a reconnect, publish the request again this often until something arrives


def new_request_id() -> str:
    return f"r{uuid.uuid4().hex[:16]}"


def addressing(client: MqttClient, cluster: str, request: GenerateRequest) -> tuple[GenerateRequest, str, str]:
    """(request, topic to publish it on, topic of its responses).

    A client logged in as user U (a secured cluster) may publish only on `requests/U` and read
    only `responses/U/+`: the request goes there, with ``client`` = U. Without a username it
    goes on the open `requests` topic and is answered on `responses/{id}`."""
    user = client.url.username
    if user is None or not topics.is_id("client", user):
        return request, topics.REQUESTS.build(cluster), topics.RESPONSES.build(cluster, request=request.id)
    return (dataclasses.replace(request, client=user), topics.REQUESTS_FROM.build(cluster, client=user),
            topics.CLIENT_RESPONSES.build(cluster, client=user, request=request.id))


def generate_remote(client: MqttClient, cluster: str, request: GenerateRequest, *,
                    on_text: Callable[[str], None] | None = None, timeout: float = 120.0,
                    on_resend: Callable[[], None] | None = None) -> GenerateResult:
    """Send ``request`` and return its final result, streaming text to ``on_text``.

    Subscribes to the response topic before publishing, so no token is missed. Raises
    MqttTimeout after ``timeout`` seconds without a response; ``on_resend`` is called each
    time the request is published again after a reconnect.
    """
    inbox: queue.Queue[TokenEvent | GenerateResult] = queue.Queue()
    request, request_topic, name = addressing(client, cluster, request)

    def subscribe() -> None:
        client.subscribe(topics.RESPONSES, name, lambda _t, value, _r: inbox.put(value), wait=10.0)

    def send() -> None:
        client.publish(topics.REQUESTS, request_topic, request, wait=10.0)

    reconnected = threading.Event()
    subscribe()
    remove_listener = client.on_reconnect(reconnected.set)
    resume = _Resume()
    try:
        send()
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
                return event
            if resume.fresh(event) and on_text is not None:
                on_text(event.text)
    finally:
        remove_listener()
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
