"""A head without a network, for the head's tests: a fake client that keeps the head's handlers
by topic kind and records what it publishes, and ``make_head`` that starts a head on it with
a ready one-stage plan.

pytest runs with --import-mode=importlib: tests get these through fixtures only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from linguamq import topics
from linguamq.hub.chat import no_chat
from linguamq.hub.head import Head, HeadSettings
from linguamq.schemas import envelope
from linguamq.schemas.cluster import NodeStatus, Plan, Stage
from linguamq.schemas.envelope import ActHeader
from linguamq.schemas.examples import MANIFEST
from linguamq.schemas.requests import CancelRequest, GenerateRequest, GenerateResult, TokenEvent


def wait_until(predicate: Callable[[], object], timeout: float = 5.0) -> None:
    """Until ``predicate`` is true (a bound, not a speed)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


class FakeClient:
    """Stands in for MqttClient: handlers by topic kind, publishes recorded as (kind, name, value)."""

    def __init__(self, cluster: str) -> None:
        self.cluster = cluster
        self.handlers: dict[str, Any] = {}
        self.published: list[tuple[str, str, Any]] = []  # envelopes decoded to (header, array)
        self.errors: list[dict[str, Any]] = []

    def subscribe(self, topic: topics.Topic, filter_: str, handler: Any, **_kw: Any) -> None:
        self.handlers[topic.kind] = handler

    def publish(self, topic: topics.Topic, name: str, payload: Any, **_kw: Any) -> None:
        value = envelope.decode(payload) if topic.payload == "envelope" else payload
        self.published.append((topic.kind, name, value))

    def report_error(self, cluster: str, **fields: Any) -> None:
        self.errors.append(fields)

    # --- what the head sent -------------------------------------------------------------

    def acts(self) -> list[ActHeader]:
        return [v[0] for k, _, v in self.published if k == "act" and not v[0].end]

    def ends(self) -> list[ActHeader]:
        return [v[0] for k, _, v in self.published if k == "act" and v[0].end]

    def results(self) -> list[GenerateResult]:
        return [v for k, _, v in self.published if k == "responses" and isinstance(v, GenerateResult)]

    def events(self) -> list[TokenEvent]:
        return [v for k, _, v in self.published if k == "responses" and isinstance(v, TokenEvent)]

    def on(self, name: str) -> list[Any]:
        """What was published on topic ``name``."""
        return [v for _, n, v in self.published if n == name]

    def kinds(self) -> list[str]:
        """Steps, ends, events and results in the order the head published them."""
        return [("end" if v[0].end else "step") if k == "act" else
                ("event" if isinstance(v, TokenEvent) else "result")
                for k, _, v in self.published if k in ("act", "responses")]

    # --- what the cluster sends the head -------------------------------------------------

    def ask(self, request: GenerateRequest, user: str | None = None) -> None:
        """Publish ``request`` as ``user`` (on `requests/{user}`; None: the open `requests`) and
        wait until the head answered it somehow (a step, a result or a report): prompts are
        tokenized on the head's intake thread."""
        before = len(self.published) + len(self.errors)
        if user is None:
            self.handlers["requests"](topics.REQUESTS.build(self.cluster), request, False)
        else:
            self.handlers["requests_from"](topics.REQUESTS_FROM.build(self.cluster, client=user), request, False)
        wait_until(lambda: len(self.published) + len(self.errors) > before)

    def cancel(self, cancel: CancelRequest, user: str | None = None) -> None:
        """Publish ``cancel`` as ``user`` (on `cancel/{user}`; None: the open `cancel`)."""
        if user is None:
            self.handlers["cancel"](topics.CANCEL.build(self.cluster), cancel, False)
        else:
            self.handlers["cancel_from"](topics.CANCEL_FROM.build(self.cluster, client=user), cancel, False)

    def token(self, header: ActHeader, value: int) -> None:
        """The tail's output for the step ``header`` sent."""
        out = np.array([[value]], dtype=np.int64)
        reply = ActHeader.for_tensor(out, session=header.session, request=header.request, step=header.step,
                                     epoch=header.epoch, piece=len(MANIFEST.pieces), start_pos=header.start_pos + 1,
                                     chain=header.chain)
        self.handlers["session_out"](topics.SESSION_OUT.build(self.cluster, session=header.session),
                                     (reply, out), False)

    def plan(self, plan: Plan) -> None:
        self.handlers["plan"](topics.PLAN.build(self.cluster), plan, True)


MakeHead = Callable[..., tuple[Head, FakeClient]]


@pytest.fixture
def make_head() -> Iterator[MakeHead]:
    """``make_head(cluster=..., encode=..., encode_chat=..., **HeadSettings fields)`` -> (a started head whose
    one-stage plan on n1 is ready at epoch 4, its fake client); heads stop at the test's end. The
    ring is off unless ``ring=True``: the fake client answers each step the head sends.
    ``decode`` maps token id i to chr(97 + i % 26); examples.MANIFEST's EOS is 2."""
    heads: list[Head] = []

    def make(*, cluster: str = "t-head", encode: Callable[[str], list[int]] = lambda text: [5] * len(text),
             encode_chat: Any = no_chat, **settings: Any) -> tuple[Head, FakeClient]:
        client = FakeClient(cluster)
        settings.setdefault("ring", False)  # these tests play the tail: the head sends every step
        head = Head(client=client, manifest=MANIFEST, encode=encode, encode_chat=encode_chat,  # type: ignore[arg-type]
                    decode=lambda ids: "".join(chr(97 + i % 26) for i in ids),
                    settings=HeadSettings(cluster=cluster, **settings))
        head.start()
        heads.append(head)
        client.plan(Plan(epoch=4, objective="even", stages=(Stage(node="n1", first=0, last=3, predicted_ms=0.0),),
                         predicted_ms_per_token=0.0))
        client.handlers["node_status"](topics.NODE_STATUS.build(cluster, node="n1"),
                                       NodeStatus(node="n1", state="ready", ts=1.0, epoch=4), True)
        assert head.ready
        return head, client

    yield make
    for head in heads:
        head.stop()
