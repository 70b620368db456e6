"""Answers clock pings, so that a tracer can put every node's timestamps on one clock.

A tracer publishes ``ClockPing(client, seq, t0)`` on `nodes/{node}/ping`; the node
answers at once on `clock/{client}` with its own wall clock at arrival (t1) and at
departure (t2). The tracer, receiving at t3, estimates the node's offset NTP-style
(``((t1 - t0) + (t2 - t3)) / 2``) and keeps the sample with the smallest round trip.

The answer is sent from paho's network thread: it is a few microseconds of work, and
answering from the worker would measure the node's queue, not its clock.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from linguamq import topics
from linguamq.schemas.cluster import ClockPing, ClockPong
from linguamq.topics.client import MqttClient, MqttError


class ClockResponder:
    """Subscribes to this node's ping topic and answers every ping with a ClockPong."""

    def __init__(self, *, client: MqttClient, cluster: str, node: str,
                 clock: Callable[[], float] = time.time) -> None:
        self._client, self._cluster, self._node, self._clock = client, cluster, node, clock
        self.answered = 0

    def start(self) -> ClockResponder:
        self._client.subscribe(topics.PING, topics.PING.build(self._cluster, node=self._node), self._on_ping)
        return self

    def answer(self, ping: ClockPing, t1: float) -> ClockPong:
        """The pong for ``ping`` that arrived at ``t1`` (node clock); t2 is read now."""
        return ClockPong(node=self._node, seq=ping.seq, t0=ping.t0, t1=t1, t2=self._clock())

    def _on_ping(self, topic: str, ping: ClockPing, retained: bool) -> None:
        t1 = self._clock()
        if retained:
            return  # someone retained a ping: its t0 is long gone
        try:
            self._client.publish(topics.PONG, topics.PONG.build(self._cluster, client=ping.client),
                                 self.answer(ping, t1))
            self.answered += 1
        except MqttError:
            pass  # a lost answer is a lost sample; the tracer pings again
