"""The one exception a decoder of ours may raise for bad input."""

from __future__ import annotations


class SchemaError(ValueError):
    """A payload does not match its schema. The message names the offending field.

    ``field`` is a dotted path ("pieces[2].sha256") or "" for the payload as a whole.
    """

    def __init__(self, message: str, *, field: str = "") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.reason = message
