"""The head's watchdog survives a failed round: a retry whose publish fails during a broker
blip is logged and counted, and the step is retried again later (the thread used to die
on it: no step was ever retried or timed out again)."""

from __future__ import annotations

import threading
import time

from linguamq import topics
from linguamq.hub.head import Head, HeadSettings
from linguamq.schemas import envelope
from linguamq.schemas.cluster import NodeStatus, Plan, Stage
from linguamq.schemas.envelope import ActHeader
from linguamq.schemas.examples import MANIFEST
from linguamq.schemas.requests import GenerateRequest
from linguamq.topics.client import MqttError

CLUSTER = "t-watch"


class _BlippingClient:
    """Records the head's step inputs; fails the publish of the ``fail_act``-th one."""

    def __init__(self, fail_act: int) -> None:
        self.handlers: dict[str, object] = {}
        self.acts: list[ActHeader] = []
        self.fail_act = fail_act
        self.lock = threading.Lock()

    def subscribe(self, topic, filter_, handler, **_kw) -> None:
        self.handlers[topic.kind] = handler

    def publish(self, topic, name, payload, **_kw) -> None:
        if topic.kind != "act":
            return
        with self.lock:
            if len(self.acts) + 1 == self.fail_act:
                self.fail_act = 0
                raise MqttError(f"publish to {name} failed: The client is not currently connected.")
            self.acts.append(envelope.decode(payload)[0])

    def report_error(self, cluster, **fields) -> None:
        pass

    def count(self) -> int:
        with self.lock:
            return len(self.acts)


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_retry_whose_publish_fails_is_counted_and_the_step_retried_again() -> None:
    client = _BlippingClient(fail_act=2)  # the step goes out; its first retry hits the blip
    head = Head(client=client, manifest=MANIFEST, encode=lambda text: [5, 6, 7], decode=lambda ids: "x" * len(ids),
                settings=HeadSettings(cluster=CLUSTER, retry_min_s=0.1, max_retries=5, step_timeout_s=60))
    head.start()
    try:
        client.handlers["plan"](topics.PLAN.build(CLUSTER), Plan(
            epoch=3, objective="even", stages=(Stage(node="n1", first=0, last=3, predicted_ms=0.0),),
            predicted_ms_per_token=0.0), True)
        client.handlers["node_status"](topics.NODE_STATUS.build(CLUSTER, node="n1"),
                                       NodeStatus(node="n1", state="ready", ts=1.0, epoch=3), True)
        client.handlers["requests"](topics.REQUESTS.build(CLUSTER),
                                    GenerateRequest(id="r1", prompt="abc", max_tokens=2), False)
        wait_until(lambda: client.count() == 1)  # the prefill (tokenized on the head's intake thread)
        wait_until(lambda: client.count() == 2)  # retried again after the failed retry
        first, retry = client.acts
        assert (retry.request, retry.session, retry.step, retry.epoch, retry.start_pos) == (
            "r1", first.session, 0, 3, 0)
        assert head.errors == 1 and head.retries == 2
    finally:
        head.stop()
