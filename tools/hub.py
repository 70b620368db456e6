"""The hub: broker (embedded or external) + retained manifest + blob server + planner + head.

Composition only: each part lives in its own package; this module wires them together.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import structlog
from tokenizers import Tokenizer

from linguamq import topics
from linguamq.broker.embedded import BrokerThread, EmbeddedBroker
from linguamq.tools.broker_process import BrokerProcess
from linguamq.node.blobs import BlobServer
from linguamq.node.head import Head, HeadSettings
from linguamq.planner.service import PlannerService, PlannerSettings
from linguamq.schemas.manifest import ModelManifest
from linguamq.topics.client import MqttClient

log = structlog.get_logger()
MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class HubSettings:
    artifacts: Path
    cluster: str = "home"
    host: str = "127.0.0.1"
    port: int = 1883
    broker_url: str | None = None  # an external broker (mosquitto); None: run the embedded one
    broker_in_process: bool = True  # the embedded broker in a child process (its own GIL)
    min_nodes: int = 1
    settle_s: float = 1.0
    objective: str = "latency"  # or "throughput", or "even" (LinguaLinked's baseline split)
    max_sessions: int = 64
    plan_sessions: int = 1  # sessions the planner plans for: KV per node, in flight for "throughput"
    drift_ratio: float = 1.3  # replan when a node's measured time is this far off; inf: never


def load_manifest(artifacts: Path) -> tuple[ModelManifest, bytes]:
    """The manifest of an artifact directory, and the exact bytes the hub publishes."""
    manifest = ModelManifest.from_json((artifacts / MANIFEST).read_bytes())
    return manifest, manifest.to_json()


def tokenizer_codec(artifacts: Path, manifest: ModelManifest):
    """(encode, decode) of the model's tokenizer, as run-local uses them."""
    tokenizer = Tokenizer.from_file(str(artifacts / manifest.tokenizer_file))
    return (lambda text: tokenizer.encode(text).ids,
            lambda ids: tokenizer.decode(ids, skip_special_tokens=True))


class Hub:
    def __init__(self, settings: HubSettings) -> None:
        self.settings = settings
        self._broker: BrokerThread | BrokerProcess | None = None
        self._clients: list[MqttClient] = []
        self._parts: list = []
        self.url = settings.broker_url or ""
        self.manifest, self._manifest_bytes = load_manifest(settings.artifacts)
        self.planner: PlannerService | None = None
        self.head: Head | None = None

    def start(self) -> Hub:
        s = self.settings
        if s.broker_url is None:
            self._broker = (BrokerProcess(host=s.host, port=s.port) if s.broker_in_process
                            else BrokerThread(broker=EmbeddedBroker(host=s.host, port=s.port)))
            self._broker.start()
            self.url = self._broker.url
        control = self._client(f"hub-{s.cluster}")
        control.publish(topics.MODEL, topics.MODEL.build(s.cluster), self._manifest_bytes, wait=10.0)
        files = {p.sha256: s.artifacts / p.file for p in self.manifest.pieces}
        self._start(BlobServer(client=control, cluster=s.cluster, files=files, reporter=f"hub-{s.cluster}"))
        manifest_sha = hashlib.sha256(self._manifest_bytes).hexdigest()
        planner = PlannerSettings(objective=s.objective, settle_s=s.settle_s, min_nodes=s.min_nodes,
                                  max_sessions=s.plan_sessions, drift_ratio=s.drift_ratio)
        self.planner = self._start(PlannerService(client=control, cluster=s.cluster, manifest=self.manifest,
                                                  manifest_sha256=manifest_sha, settings=planner))
        encode, decode = tokenizer_codec(s.artifacts, self.manifest)
        self.head = self._start(Head(client=self._client(f"head-{s.cluster}"), manifest=self.manifest,
                                     encode=encode, decode=decode,
                                     settings=HeadSettings(cluster=s.cluster, max_sessions=s.max_sessions)))
        log.info("hub started", url=self.url, cluster=s.cluster, model=self.manifest.name)
        return self

    def stop(self) -> None:
        for part in reversed(self._parts):
            part.stop()
        for client in self._clients:
            client.stop()
        if self._broker is not None:
            self._broker.stop()

    def __enter__(self) -> Hub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _client(self, client_id: str) -> MqttClient:
        client = MqttClient(url=self.url, client_id=client_id).start()
        self._clients.append(client)
        return client

    def _start(self, part):
        part.start()
        if hasattr(part, "stop"):
            self._parts.append(part)
        return part
