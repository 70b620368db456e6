"""API keys: a client user's login, as one bearer token.

A key is ``lmq-`` + base64url("name:password"): the gateway logs in to the broker as that
user with it, so the broker (embedded or mosquitto, the same users file) checks every key
and enforces the user's topics: a key reaches only its own requests and answers, and the
head's rate limit per client applies to it as to any MQTT client. The gateway stores no
secret of its own and cannot be talked into acting for another user.
"""

from __future__ import annotations

import base64
import binascii

PREFIX = "lmq-"


class BadKey(ValueError):
    """Not an API key of ours."""


def api_key(name: str, password: str) -> str:
    raw = f"{name}:{password}".encode()
    return PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_api_key(key: str) -> tuple[str, str]:
    """(user name, password) of ``key``; BadKey if it is not one."""
    if not key.startswith(PREFIX):
        raise BadKey(f"an API key starts with {PREFIX!r} (see `linguamq users add NAME --role client`)")
    body = key[len(PREFIX):]
    try:
        name, sep, password = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise BadKey("the API key is damaged (not base64url)") from None
    if not sep or not name:
        raise BadKey("the API key is damaged (no user name in it)")
    return name, password
