"""The node's blob cache never holds paho's network thread: while a fetch waits, the
node's other subscriptions (its assignment, activations, keep-alives) still flow.

It used to: chunks the fetch had not asked for (QoS 1 redeliveries, a second server)
filled its inbox and the next one blocked the network thread for the whole fetch
timeout (30 s); and a fetch started from a handler waited there for its own SUBACK.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from linguamq import topics
from linguamq.broker import BrokerThread
from linguamq.node.blobs import BlobCache, BlobError
from linguamq.schemas.blobs import BlobRequest, encode_chunk
from linguamq.topics.client import MqttClient

pytestmark = pytest.mark.integration
CLUSTER = "t-blobs"
DATA = b"a piece of a model" * 100
SHA = hashlib.sha256(DATA).hexdigest()
TIMEOUT = 30.0  # the cache's wait for a chunk (its default)
WAIT = 10.0  # well below it


@pytest.fixture
def clients() -> Iterator[tuple[MqttClient, MqttClient]]:
    with BrokerThread() as broker, MqttClient(url=broker.url, client_id="hub") as hub, \
            MqttClient(url=broker.url, client_id="n1") as node:
        yield hub, node


def test_chunks_nobody_asked_for_do_not_block_the_nodes_other_messages(
        clients: tuple[MqttClient, MqttClient], tmp_path: Path) -> None:
    hub, node = clients

    def serve_eight_times(_topic: str, request: BlobRequest, _retained: bool) -> None:
        chunk = encode_chunk(SHA, request.offset, len(DATA), DATA[request.offset:request.offset + request.length])
        for _ in range(8):
            hub.publish(topics.BLOB_CHUNK, topics.BLOB_CHUNK.build(CLUSTER, sha256=SHA, node="n1"), chunk)
        hub.publish_raw("t/after", b"next message", qos=1)  # delivered to the node after the chunks

    hub.subscribe(topics.BLOB_REQUEST, topics.BLOB_REQUEST.filter(CLUSTER), serve_eight_times, wait=WAIT)
    after = threading.Event()
    node.subscribe_raw("t/after", lambda _msg: after.set(), qos=1, wait=WAIT)
    cache = BlobCache(root=tmp_path, client=node, cluster=CLUSTER, node="n1", timeout=TIMEOUT)
    writing, release = threading.Event(), threading.Event()

    def slow_disk(_done: int, _total: int) -> None:  # the fetch is busy while the copies arrive
        writing.set()
        release.wait(TIMEOUT)

    fetch = threading.Thread(target=cache.ensure, args=(SHA,), kwargs={"progress": slow_disk}, daemon=True)
    fetch.start()
    try:
        assert writing.wait(WAIT)
        assert after.wait(WAIT), "the node's network thread was held by the blob cache"
    finally:
        release.set()
    fetch.join(WAIT)
    assert cache.path(SHA).read_bytes() == DATA


def test_a_fetch_from_a_handler_is_refused_at_once(clients: tuple[MqttClient, MqttClient], tmp_path: Path) -> None:
    hub, node = clients
    cache = BlobCache(root=tmp_path, client=node, cluster=CLUSTER, node="n1", timeout=TIMEOUT)
    outcome: list[BaseException | None] = []
    after = threading.Event()

    def handler(_msg: object) -> None:
        try:
            cache.ensure(SHA)
            outcome.append(None)
        except Exception as exc:
            outcome.append(exc)

    node.subscribe_raw("t/fetch", handler, qos=1, wait=WAIT)
    node.subscribe_raw("t/after", lambda _msg: after.set(), qos=1, wait=WAIT)
    hub.publish_raw("t/fetch", b"fetch now", qos=1)
    hub.publish_raw("t/after", b"next message", qos=1)
    assert after.wait(WAIT), "the node's network thread was held by the blob cache"
    (error,) = outcome
    assert isinstance(error, BlobError) and "MQTT handler" in str(error)
