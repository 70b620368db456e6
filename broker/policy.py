"""Who may read or publish what: the hooks every delivery path of the broker goes through.

A policy is a plain synchronous function ``(ClientInfo, topic) -> bool``. The broker calls
``may_read`` for every message it is about to send to a client -- live messages, messages
queued for an offline session and retained messages sent on SUBSCRIBE alike -- and
``may_publish`` for every PUBLISH a client sends and for the will a client registers in its
CONNECT. It is synchronous on purpose: it runs once per message and subscriber, and amqtt
iterates its subscription table around this call, so the call must not yield to the loop.
A policy that raises denies (fail closed) and the broker logs the error.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable


@dataclasses.dataclass(frozen=True, slots=True)
class ClientInfo:
    """What a policy knows about a connected client (from its CONNECT packet)."""

    client_id: str
    username: str | None = None


TopicPolicy = Callable[[ClientInfo, str], bool]
# (username, password) -> may this client connect? Run in a worker thread: it may be slow on
# purpose (a password hash), so the broker's event loop keeps serving the others meanwhile.
Authenticate = Callable[[str | None, str | bytes | None], bool]


def allow_all(client: ClientInfo, topic: str) -> bool:
    """The default policy: every client may read and publish every topic."""
    del client, topic
    return True
