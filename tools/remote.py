"""Generate through a running cluster: publish a request, follow its responses."""

from __future__ import annotations

import queue
import uuid
from collections.abc import Callable

from linguamq import topics
from linguamq.schemas.requests import GenerateRequest, GenerateResult, TokenEvent
from linguamq.topics.client import MqttClient, MqttTimeout


def new_request_id() -> str:
    return f"r{uuid.uuid4().hex[:16]}"


def generate_remote(client: MqttClient, cluster: str, request: GenerateRequest, *,
                    on_text: Callable[[str], None] | None = None, timeout: float = 120.0) -> GenerateResult:
    """Send ``request`` and return its final result, streaming text to ``on_text``.

    Subscribes to the response topic before publishing, so no token is missed.
    """
    inbox: queue.Queue[TokenEvent | GenerateResult] = queue.Queue()
    name = topics.RESPONSES.build(cluster, request=request.id)
    client.subscribe(topics.RESPONSES, name, lambda _t, value, _r: inbox.put(value), wait=10.0)
    try:
        client.publish(topics.REQUESTS, topics.REQUESTS.build(cluster), request, wait=10.0)
        while True:
            try:
                event = inbox.get(timeout=timeout)
            except queue.Empty:
                raise MqttTimeout(f"request {request.id}: no response for {timeout:.0f} s "
                                  "(is a hub running on this cluster?)") from None
            if isinstance(event, GenerateResult):
                return event
            if on_text is not None:
                on_text(event.text)
    finally:
        client.unsubscribe(name)
