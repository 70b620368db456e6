"""What ``linguamq.Client`` raises: one small tree, the same failures `linguamq generate`
reports (it is built on the client).

    LinguamqError
    ├── RequestError        the request is invalid (empty id, max_tokens out of range, ...):
    │                       refused before anything is sent; also a ValueError
    ├── ConnectionFailed    the broker cannot be reached, or the connection failed (TLS, URL)
    │   └── NotAuthorized   the broker refused the login (check username/password)
    ├── Timeout             no response within the timeout (is a hub running on the cluster?)
    └── GenerationError     the cluster answered with an error (``.result`` holds its answer)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from linguamq.schemas.requests import GenerateResult


class LinguamqError(Exception):
    """Every error of the client API."""


class RequestError(LinguamqError, ValueError):
    """The request is not valid; nothing was sent."""


class ConnectionFailed(LinguamqError):
    """The broker cannot be reached, or the connection to it failed."""


class NotAuthorized(ConnectionFailed):
    """The broker refused the username and password."""


class Timeout(LinguamqError):
    """No response within the client's timeout."""


class GenerationError(LinguamqError):
    """The cluster ended the request with an error; ``result`` is its final answer."""

    def __init__(self, result: GenerateResult) -> None:
        super().__init__(result.error or "the request failed")
        self.result = result
