"""The hub's side of artifacts over MQTT: serve an artifact directory's files in chunks.

A node asks on `blobs/{sha256}/request` (offset, length) and gets the chunk on
`blobs/{sha256}/chunks/{node}`; ``linguamq.node.blobs`` is the asking side.
"""

from __future__ import annotations

import threading
from pathlib import Path

from linguamq import topics
from linguamq.schemas.blobs import BlobRequest, encode_chunk
from linguamq.topics.client import MqttClient


class BlobServer:
    """Serves the files of an artifact directory to nodes that ask for them."""

    def __init__(self, *, client: MqttClient, cluster: str, files: dict[str, Path],
                 reporter: str) -> None:
        self._client, self._cluster, self._files, self._reporter = client, cluster, dict(files), reporter
        self._lock = threading.Lock()

    def start(self) -> None:
        self._client.subscribe(topics.BLOB_REQUEST, topics.BLOB_REQUEST.filter(self._cluster), self._on_request,
                               on_reject=self._reject)

    def _on_request(self, topic: str, request: BlobRequest, retained: bool) -> None:
        path = self._files.get(request.sha256)
        if path is None:
            return self._report(topic, request.node, f"no artifact {request.sha256[:12]} here")
        total = path.stat().st_size
        if request.offset > total:
            return self._report(topic, request.node, f"offset {request.offset} is past the end ({total})")
        with self._lock, path.open("rb") as f:
            f.seek(request.offset)
            data = f.read(request.length)
        name = topics.BLOB_CHUNK.build(self._cluster, sha256=request.sha256, node=request.node)
        self._client.publish(topics.BLOB_CHUNK, name, encode_chunk(request.sha256, request.offset, total, data))

    def _reject(self, topic: str, payload: bytes, exc: Exception) -> None:
        self._report(topic, self._reporter, str(exc))

    def _report(self, topic: str, to: str, message: str) -> None:
        self._client.report_error(self._cluster, reporter=self._reporter, to=to, topic=topic,
                                  code="bad_request", message=message)
