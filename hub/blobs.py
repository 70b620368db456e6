"""The hub's side of artifacts over MQTT: serve an artifact directory's files in chunks.

A node asks on `blobs/{sha256}/request` (offset, length) and gets the chunk on
`blobs/{sha256}/chunks/{node}`; ``linguamq.node.blobs`` is the asking side. Files are read
by a worker thread: a slow disk must not stall the MQTT network thread, which delivers
the hub's other messages too.
"""

from __future__ import annotations

import queue
import threading
from pathlib import Path

import structlog

from linguamq import topics
from linguamq.schemas.blobs import BlobRequest, encode_chunk
from linguamq.schemas.requests import ErrorCode
from linguamq.topics.client import MqttClient, MqttError

log = structlog.get_logger()

# Requests waiting for the disk. A node asks for one chunk at a time, so only a flood fills
# it: the excess is answered `overloaded` and dropped; a node's fetch that loses its request
# fails after its timeout and resumes from its .part file on the next try.
MAX_QUEUED = 64


class BlobServer:
    """Serves the files of an artifact directory to nodes that ask for them."""

    def __init__(self, *, client: MqttClient, cluster: str, files: dict[str, Path],
                 reporter: str, max_queued: int = MAX_QUEUED) -> None:
        self._client, self._cluster, self._files, self._reporter = client, cluster, dict(files), reporter
        self._queue: queue.Queue[tuple[str, BlobRequest] | None] = queue.Queue(maxsize=max_queued)
        self._worker = threading.Thread(target=self._serve, name="blob-server", daemon=True)

    def start(self) -> None:
        self._worker.start()
        self._client.subscribe(topics.BLOB_REQUEST, topics.BLOB_REQUEST.filter(self._cluster), self._on_request,
                               on_reject=self._reject)

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving; requests still waiting are dropped."""
        self._client.unsubscribe(topics.BLOB_REQUEST.filter(self._cluster))
        while not self._queue.empty():
            self._queue.get_nowait()
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return  # a request delivered meanwhile; the worker is a daemon
        self._worker.join(timeout)

    def _on_request(self, topic: str, request: BlobRequest, retained: bool) -> None:
        try:
            self._queue.put_nowait((topic, request))
        except queue.Full:
            self._report(topic, request.node, f"{self._queue.maxsize} blob requests already wait; ask again",
                         code="overloaded")

    def _serve(self) -> None:
        while (item := self._queue.get()) is not None:
            try:
                self._send(*item)
            except MqttError as exc:  # the worker outlives a failed publish
                log.warning("blob chunk not sent", error=str(exc))

    def _send(self, topic: str, request: BlobRequest) -> None:
        path = self._files.get(request.sha256)
        if path is None:
            return self._report(topic, request.node, f"no artifact {request.sha256[:12]} here")
        try:
            total = path.stat().st_size
            if request.offset > total:
                return self._report(topic, request.node, f"offset {request.offset} is past the end ({total})")
            with path.open("rb") as f:
                f.seek(request.offset)
                data = f.read(request.length)
        except OSError as exc:
            return self._report(topic, request.node, f"cannot read {request.sha256[:12]}: {exc}", code="internal")
        name = topics.BLOB_CHUNK.build(self._cluster, sha256=request.sha256, node=request.node)
        self._client.publish(topics.BLOB_CHUNK, name, encode_chunk(request.sha256, request.offset, total, data))

    def _reject(self, topic: str, payload: bytes, exc: Exception) -> None:
        self._report(topic, self._reporter, str(exc))

    def _report(self, topic: str, to: str, message: str, code: ErrorCode = "bad_request") -> None:
        self._client.report_error(self._cluster, reporter=self._reporter, to=to, topic=topic,
                                  code=code, message=message)
