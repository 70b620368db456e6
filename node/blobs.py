"""Artifacts over MQTT: a node's disk cache that fetches what it lacks (the hub serves them:
``linguamq.hub.blobs``).

A node asks for a blob in chunks on `blobs/{sha256}/request` and receives them on
`blobs/{sha256}/chunks/{node}`. Chunks are written to ``{sha}.part`` as they arrive, so
an interrupted fetch resumes where it stopped; the whole file's sha256 is checked
against the manifest before it is renamed into place, and a cached file whose hash no
longer matches (a corrupted disk) is fetched again.

A fetch waits for the network (its SUBACK, each chunk), so it never runs on paho's
network thread (``ensure`` refuses to): that thread would wait for itself, keep-alives
would lapse and the broker would drop the node. The chunk handler never waits either: a
chunk the fetch did not ask for (a QoS 1 redelivery, a second server) is dropped.
"""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Callable
from pathlib import Path

import structlog

from linguamq import topics
from linguamq.schemas.blobs import BlobChunk, BlobRequest
from linguamq.schemas.manifest import file_sha256
from linguamq.topics.client import MqttClient

log = structlog.get_logger()

CHUNK_BYTES = 1 << 20


class BlobError(RuntimeError):
    """An artifact could not be fetched or failed its hash check."""


class BlobCache:
    """Files named by their sha256 in ``root``; ``fetch`` fills it over MQTT."""

    def __init__(self, *, root: Path, client: MqttClient, cluster: str, node: str,
                 chunk_bytes: int = CHUNK_BYTES, timeout: float = 30.0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._client, self._cluster, self._node = client, cluster, node
        self._chunk_bytes, self._timeout = chunk_bytes, timeout
        self._lock = threading.Lock()  # one fetch at a time: a load and a prefetch share the cache

    def path(self, sha256: str) -> Path:
        return self.root / sha256

    def has(self, sha256: str) -> bool:
        """True if the file is cached and its bytes still hash to ``sha256``."""
        path = self.path(sha256)
        if not path.exists():
            return False
        if file_sha256(path) == sha256:
            return True
        log.warning("cached artifact corrupted, fetching again", sha256=sha256[:12], node=self._node)
        path.unlink()
        return False

    def ensure(self, sha256: str, *, progress: Callable[[int, int], None] | None = None) -> Path:
        """The verified local path of blob ``sha256``, fetched over MQTT if missing."""
        if self._client.on_network_thread:
            raise BlobError(f"artifact {sha256[:12]}: fetched from an MQTT handler; a fetch must run on a "
                            "worker thread (the network thread would wait for itself)")
        with self._lock:
            if not self.has(sha256):
                self._fetch(sha256, progress)
        return self.path(sha256)

    def _fetch(self, sha256: str, progress: Callable[[int, int], None] | None) -> None:
        part = self.root / f"{sha256}.part"
        inbox: queue.Queue[tuple[BlobChunk, bytes]] = queue.Queue(maxsize=4)
        filter_ = topics.BLOB_CHUNK.build(self._cluster, sha256=sha256, node=self._node)

        def on_chunk(_topic: str, value: tuple[BlobChunk, memoryview], _retained: bool) -> None:
            try:  # on the network thread: never wait; the fetch asks for one chunk at a time
                inbox.put_nowait((value[0], bytes(value[1])))
            except queue.Full:
                log.warning("blob chunk not asked for, dropped", sha256=sha256[:12], offset=value[0].offset,
                            node=self._node)

        self._client.subscribe(topics.BLOB_CHUNK, filter_, on_chunk, wait=self._timeout)
        try:
            with part.open("ab") as out:
                offset = out.tell()  # resume an interrupted fetch
                total = None
                while total is None or offset < total:
                    header, data = self._request(sha256, offset, inbox)
                    total = header.total
                    out.write(data)
                    offset += len(data)
                    if progress is not None:
                        progress(offset, total)
        finally:
            self._client.unsubscribe(filter_)
        if file_sha256(part) != sha256:
            part.unlink()
            raise BlobError(f"artifact {sha256[:12]}: downloaded bytes do not match the manifest's sha256")
        os.replace(part, self.path(sha256))

    def _request(self, sha256: str, offset: int, inbox: queue.Queue) -> tuple[BlobChunk, bytes]:
        request = BlobRequest(node=self._node, sha256=sha256, offset=offset, length=self._chunk_bytes)
        self._client.publish(topics.BLOB_REQUEST, topics.BLOB_REQUEST.build(self._cluster, sha256=sha256), request)
        try:
            header, data = inbox.get(timeout=self._timeout)
        except queue.Empty:
            raise BlobError(f"artifact {sha256[:12]}: no chunk at offset {offset} within {self._timeout:.0f} s "
                            "(is the hub serving this model?)") from None
        if header.offset != offset or header.sha256 != sha256:
            raise BlobError(f"artifact {sha256[:12]}: got chunk at {header.offset}, asked for {offset}")
        return header, data
