"""Who may read and publish what, derived from a user's role and the topic namespace.

One table (``RULES``) gives, per role, the topics a user may publish and read, relative to
``lmq/{cluster}/`` in any cluster; a placeholder listed in ``own`` must equal the user's
name. The same table becomes the embedded broker's ``may_read``/``may_publish`` policies
(``policies``) and mosquitto's ``acl_file`` (``mosquitto_acl``), so both brokers enforce
the same rules:

- ``hub``: everything (the hub's planner, head and blob server, `linguamq trace`).
- ``node`` U: publishes its own status (and will), telemetry, probe and errors, activations,
  session outputs, blob requests and clock answers; reads the manifest, its own assignment,
  control, probe and pings, activations, the blob chunks addressed to it, and the hub's
  telemetry (the ring stops a silent head's chains).
- ``client`` U: publishes requests on `requests/U` and cancels on `cancel/U`; reads
  `responses/U/+` and `errors/U`.

What it cannot stop: a node may publish any activation or session output (it is part of
the pipeline; a hostile node can corrupt generation but cannot read what it should not).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

from linguamq import topics as T
from linguamq.broker.policy import ClientInfo, TopicPolicy
from linguamq.broker.users import Credentials
from linguamq.topics import Topic, TopicError

READ, WRITE = "read", "write"


@dataclasses.dataclass(frozen=True)
class Rule:
    access: str  # READ or WRITE
    topic: Topic
    own: tuple[str, ...] = ()  # placeholders that must be the user's own name

    def allows(self, user: str, params: dict[str, str | int]) -> bool:
        return all(params.get(p) == user for p in self.own)

    def pattern(self, user: str, cluster: str | None = None) -> str:
        """The MQTT filter this rule grants ``user`` (in ``cluster``; None: any cluster)."""
        return self.topic.filter(cluster, **{p: user for p in self.own})


_NODE = (
    Rule(WRITE, T.NODE_STATUS, ("node",)), Rule(WRITE, T.NODE_TELEMETRY, ("node",)),
    Rule(WRITE, T.NODE_PROBE, ("node",)), Rule(WRITE, T.ERRORS, ("client",)),
    Rule(WRITE, T.ACT), Rule(WRITE, T.SESSION_OUT), Rule(WRITE, T.BLOB_REQUEST), Rule(WRITE, T.PONG),
    Rule(READ, T.MODEL), Rule(READ, T.NODE_ASSIGN, ("node",)), Rule(READ, T.NODE_CONTROL, ("node",)),
    Rule(READ, T.NODE_PROBE, ("node",)), Rule(READ, T.PING, ("node",)), Rule(READ, T.ACT),
    Rule(READ, T.BLOB_CHUNK, ("node",)), Rule(READ, T.HUB_TELEMETRY),
)
_CLIENT = (
    Rule(WRITE, T.REQUESTS_FROM, ("client",)), Rule(WRITE, T.CANCEL_FROM, ("client",)),
    Rule(READ, T.CLIENT_RESPONSES, ("client",)), Rule(READ, T.ERRORS, ("client",)),
)
RULES: dict[str, tuple[Rule, ...]] = {"node": _NODE, "client": _CLIENT}  # "hub": everything
FULL_ACCESS = frozenset({"hub"})


def allowed(role: str | None, user: str | None, access: str, topic: str) -> bool:
    """May ``user`` (of ``role``; None: unknown) ``access`` the concrete ``topic``?"""
    if role in FULL_ACCESS:
        return True
    if role is None or user is None or role not in RULES:
        return False  # unknown users and roles: fail closed
    return _allowed(role, user, access, topic)


@functools.lru_cache(maxsize=8192)
def _allowed(role: str, user: str, access: str, topic: str) -> bool:
    # Cached: the broker asks once per message and subscriber, and topics repeat (act/0 ...).
    try:
        parsed = T.parse(topic)
    except TopicError:
        return False  # not one of ours: only the hub role may use other topics
    return any(r.access == access and r.topic is parsed.topic and r.allows(user, parsed.params)
               for r in RULES[role])


def policies(role_of: Callable[[str | None], str | None]) -> tuple[TopicPolicy, TopicPolicy]:
    """(may_read, may_publish) for the embedded broker; ``role_of(username)`` -> role or None."""

    def may_read(client: ClientInfo, topic: str) -> bool:
        return allowed(role_of(client.username), client.username, READ, topic)

    def may_publish(client: ClientInfo, topic: str) -> bool:
        return allowed(role_of(client.username), client.username, WRITE, topic)

    return may_read, may_publish


def secured(credentials: Credentials) -> dict[str, Any]:
    """``EmbeddedBroker`` keyword arguments that enforce a users file: authentication and ACLs."""
    may_read, may_publish = policies(credentials.role)
    return {"authenticate": credentials.authenticate, "may_read": may_read, "may_publish": may_publish}


def mosquitto_acl(users: dict[str, str], cluster: str | None = None) -> str:
    """mosquitto ``acl_file`` text for ``users`` (name -> role): one ``user`` block each.
    ``cluster``: grant topics of that cluster only (None: of any cluster, like ours)."""
    lines = ["# Written by `linguamq users export-mosquitto`: the rules of broker/acl.py.",
             "# Anything not granted here is denied (anonymous clients get nothing).", ""]
    for name, role in users.items():
        lines.append(f"user {name}")
        if role in FULL_ACCESS:
            lines.append("topic readwrite #")
        else:
            lines.extend(f"topic {rule.access} {rule.pattern(name, cluster)}" for rule in RULES[role])
        lines.append("")
    return "\n".join(lines)
