"""Errors of the embedded broker: one hierarchy, rooted at ``BrokerError``."""

from __future__ import annotations


class BrokerError(Exception):
    """Anything the embedded broker reports to its owner."""


class BrokerConfigError(BrokerError, ValueError):
    """A broker setting is out of range (bad host, port, payload limit, timeout ...)."""


class BrokerStartError(BrokerError):
    """The broker could not start (port in use, address not available, amqtt refused)."""


class BrokerTimeoutError(BrokerError, TimeoutError):
    """Starting or stopping the broker took longer than its timeout."""


class BrokerNotRunningError(BrokerError):
    """An address or a call that needs a started broker was asked of one that is not running."""


class PayloadTooLargeError(BrokerError):
    """A client sent a packet whose payload exceeds ``max_payload``; the broker closes that
    client's connection (MQTT 3.1.1 has no way to refuse a single PUBLISH)."""
