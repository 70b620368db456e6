"""The blob server reads files off the MQTT network thread: a slow disk stalls nothing else."""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from linguamq import topics
from linguamq.broker import BrokerThread
from linguamq.hub.blobs import BlobServer
from linguamq.schemas.blobs import BlobRequest
from linguamq.schemas.requests import ErrorReport
from linguamq.topics.client import MqttClient

pytestmark = pytest.mark.integration

CLUSTER = "blobs"
WAIT = 10.0
HANG = 6 * WAIT  # a hung read is released by the test; this only bounds it if the test dies
SHA = "ab" * 32


class HangingFile(type(Path())):  # type: ignore[misc]  # PosixPath here: Path itself cannot be subclassed in 3.11
    """A file whose open() hangs until ``disk`` is set: a disk that does not answer."""

    reading: threading.Event
    disk: threading.Event

    def open(self, *args: Any, **kwargs: Any) -> Any:
        self.reading.set()
        self.disk.wait(HANG)
        return super().open(*args, **kwargs)


@contextlib.contextmanager
def hung_read(path: Path, data: bytes) -> Iterator[HangingFile]:
    """``path`` holding ``data``, as a HangingFile; its reads go on when the block ends."""
    path.write_bytes(data)
    hanging = HangingFile(path)
    hanging.reading, hanging.disk = threading.Event(), threading.Event()
    try:
        yield hanging
    finally:
        hanging.disk.set()


@pytest.fixture
def clients() -> Iterator[tuple[MqttClient, MqttClient]]:
    with BrokerThread() as broker, MqttClient(url=broker.url, client_id="hub") as hub, \
            MqttClient(url=broker.url, client_id="n1") as node:
        yield hub, node


def ask(node: MqttClient, sha256: str) -> None:
    request = BlobRequest(node="n1", sha256=sha256, offset=0, length=1024)
    node.publish(topics.BLOB_REQUEST, topics.BLOB_REQUEST.build(CLUSTER, sha256=sha256), request)


def inbox(client: MqttClient, topic: topics.Topic, name: str) -> queue.Queue:
    got: queue.Queue = queue.Queue()
    client.subscribe(topic, name, lambda _t, value, _r: got.put(value), wait=WAIT)
    return got


def test_a_hung_file_read_does_not_stall_the_hubs_other_messages(clients, tmp_path: Path) -> None:
    hub, node = clients
    with hung_read(tmp_path / "piece", b"piece bytes") as piece:
        server = BlobServer(client=hub, cluster=CLUSTER, files={SHA: piece}, reporter="hub")
        server.start()
        chunks = inbox(node, topics.BLOB_CHUNK, topics.BLOB_CHUNK.build(CLUSTER, sha256=SHA, node="n1"))
        other = threading.Event()
        hub.subscribe_raw(topics.HUB_TELEMETRY.build(CLUSTER), lambda _msg: other.set(), wait=WAIT)
        ask(node, SHA)
        assert piece.reading.wait(WAIT)
        node.publish_raw(topics.HUB_TELEMETRY.build(CLUSTER), b"another subscription's message")
        assert other.wait(WAIT), "the hub's network thread is stuck in the blob server's read"
    header, data = chunks.get(timeout=WAIT)  # the request is still answered once the read returns
    assert (header.sha256, header.offset, header.total, bytes(data)) == (SHA, 0, 11, b"piece bytes")
    server.stop()


def test_requests_beyond_the_queue_are_answered_overloaded(clients, tmp_path: Path) -> None:
    hub, node = clients
    with hung_read(tmp_path / "piece", b"piece bytes") as piece:
        server = BlobServer(client=hub, cluster=CLUSTER, files={SHA: piece}, reporter="hub", max_queued=1)
        server.start()
        errors = inbox(node, topics.ERRORS, topics.ERRORS.build(CLUSTER, client="n1"))
        ask(node, SHA)
        assert piece.reading.wait(WAIT)  # the worker is busy with the first request
        ask(node, "cd" * 32)  # waits in the queue
        ask(node, "ef" * 32)  # finds it full
        report: ErrorReport = errors.get(timeout=WAIT)
        assert (report.code, report.reporter) == ("overloaded", "hub"), report
    report = errors.get(timeout=WAIT)  # the queued one is served after the slow read
    assert (report.code, report.message) == ("bad_request", f"no artifact {'cd' * 6} here")
    server.stop()
