"""Errors of the topic namespace."""

from __future__ import annotations


class TopicError(ValueError):
    """A topic or one of its parts (cluster, node, session ...) is not valid."""
