"""The live planner's thread survives a failed round: a publish that times out during a
broker blip is logged and counted, and the plan is published on the next try (the thread
used to die on it, and the hub never planned again)."""

from __future__ import annotations

import threading
import time

from linguamq import topics
from linguamq.planner.service import PlannerService, PlannerSettings
from linguamq.schemas.cluster import Assignment, NodeStatus, Plan
from linguamq.schemas.examples import MANIFEST, SHA
from linguamq.topics.client import MqttTimeout

CLUSTER = "t-err"


class _BlippingClient:
    """Times out the first ``failures`` publishes, then records them."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.published: list[object] = []
        self.lock = threading.Lock()

    def subscribe(self, *args, **kwargs) -> None:
        pass

    def publish(self, topic, name, payload, wait=None) -> None:
        with self.lock:
            if self.failures:
                self.failures -= 1
                raise MqttTimeout(f"publish to {name} not acknowledged within {wait} s")
            self.published.append(payload)

    def plans(self) -> list[Plan]:
        with self.lock:
            return [p for p in self.published if isinstance(p, Plan)]


def wait_until(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_publish_that_times_out_is_counted_and_the_plan_published_on_the_next_try() -> None:
    client = _BlippingClient(failures=1)
    service = PlannerService(client=client, cluster=CLUSTER, manifest=MANIFEST, manifest_sha256=SHA,
                             settings=PlannerSettings(objective="even", settle_s=0.05))
    service.start()
    try:
        service._on_status(topics.NODE_STATUS.build(CLUSTER, node="n1"),
                           NodeStatus(node="n1", state="online", ts=1.0), False)
        wait_until(lambda: client.plans())
        (plan,) = client.plans()
        assert [s.node for s in plan.stages] == ["n1"] and service.plan == plan
        assignment = next(p for p in client.published if isinstance(p, Assignment))
        assert assignment.node == "n1" and assignment.epoch == plan.epoch  # the failed epoch is not reused
        assert service.errors == 1
    finally:
        service.stop()
