"""The hub: broker (embedded or external) + retained manifest + blob server + planner + head.

Composition only: each part lives in its own package; this module wires them together.
"""

from __future__ import annotations

import dataclasses
import hashlib
import secrets
from pathlib import Path
from typing import Literal

import structlog
from tokenizers import Tokenizer

from linguamq import topics
from linguamq.broker.embedded import BrokerThread, EmbeddedBroker
from linguamq.broker.process import BrokerOptions, BrokerProcess, broker_kwargs
from linguamq.broker.users import HUB_USERNAME, load_users
from linguamq.gateway.process import GatewayProcess
from linguamq.gateway.settings import GatewaySettings
from linguamq.hub.blobs import BlobServer
from linguamq.hub.head import Head, HeadSettings
from linguamq.node import system
from linguamq.planner.service import PlannerService, PlannerSettings
from linguamq.schemas.manifest import ModelManifest
from linguamq.tools.args import Login
from linguamq.tools.local import chat_encoder_for
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
    objective: Literal["latency", "throughput", "even"] = "latency"  # even: LinguaLinked's baseline split
    max_sessions: int = 64
    plan_sessions: int = 1  # sessions the planner plans for: KV per node, in flight for "throughput"
    drift_ratio: float = 1.3  # replan when a node's measured time is this far off; inf: never
    max_tokens: int = 0  # cap on a request's max_tokens; 0: the model's context is the only cap
    rate: float = 0.0  # requests per second per client; 0: no limit
    burst: int = 10  # requests a client may send at once
    prefill_chunk: int = 256  # prompt tokens per envelope; 0: whole prompts
    ring: bool = True  # the tail sends each next step to the first stage; off: the head sends every step
    # Security (embedded broker): a users file and a TLS listener; see broker/process.py.
    broker_options: BrokerOptions = BrokerOptions()
    # How the hub's own clients log in to an external broker (a hub-role user), and the CA
    # that signed an mqtts:// broker's certificate (external, or the embedded one's TLS).
    username: str | None = None
    password: str | None = None
    cafile: str | None = None
    # The HTTP gateway beside the hub (OpenAI API + dashboard): None for none, 0 for any free port.
    http_port: int | None = None
    http_host: str = "127.0.0.1"


def load_manifest(artifacts: Path) -> tuple[ModelManifest, bytes]:
    """The manifest of an artifact directory, and the exact bytes the hub publishes."""
    manifest = ModelManifest.from_json((artifacts / MANIFEST).read_bytes())
    return manifest, manifest.to_json()


def tokenizer_codec(artifacts: Path, manifest: ModelManifest):
    """(encode, decode, encode_chat) of the model's tokenizer and chat template, as run-local uses them."""
    tokenizer = Tokenizer.from_file(str(artifacts / manifest.tokenizer_file))
    return (lambda text: tokenizer.encode(text).ids,
            lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
            chat_encoder_for(artifacts, manifest, tokenizer))


class Hub:
    def __init__(self, settings: HubSettings) -> None:
        self.settings = settings
        self._broker: BrokerThread | BrokerProcess | None = None
        self._clients: list[MqttClient] = []
        self._parts: list = []
        self.url = settings.broker_url or ""
        self.tls_url: str | None = None
        self._login = Login(username=settings.username, password=settings.password, cafile=settings.cafile)
        self.manifest, self._manifest_bytes = load_manifest(settings.artifacts)
        self.planner: PlannerService | None = None
        self.head: Head | None = None
        self.http: GatewayProcess | None = None

    def start(self) -> Hub:
        s = self.settings
        if s.broker_url is None:
            options = s.broker_options
            if options.users is not None:
                load_users(options.users)  # a bad file fails here, with its line, not in the child
                # The hub's own clients: a credential of this run only, in no file.
                options = dataclasses.replace(options, hub_secret=secrets.token_urlsafe(32))
                self._login.update({"username": HUB_USERNAME, "password": options.hub_secret})
            self._broker = (BrokerProcess(host=s.host, port=s.port, options=options) if s.broker_in_process
                            else BrokerThread(broker=EmbeddedBroker(host=s.host, port=s.port,
                                                                    **broker_kwargs(options))))
            self._broker.start()
            self.url, self.tls_url = self._broker.url, self._broker.tls_url
        control = self._client(f"hub-{s.cluster}")
        control.publish(topics.MODEL, topics.MODEL.build(s.cluster), self._manifest_bytes, wait=10.0)
        files = {p.sha256: s.artifacts / p.file for p in self.manifest.pieces}
        self._start(BlobServer(client=control, cluster=s.cluster, files=files, reporter=f"hub-{s.cluster}"))
        manifest_sha = hashlib.sha256(self._manifest_bytes).hexdigest()
        planner = PlannerSettings(objective=s.objective, settle_s=s.settle_s, min_nodes=s.min_nodes,
                                  max_sessions=s.plan_sessions, drift_ratio=s.drift_ratio)
        self.planner = self._start(PlannerService(client=control, cluster=s.cluster, manifest=self.manifest,
                                                  manifest_sha256=manifest_sha, settings=planner))
        encode, decode, encode_chat = tokenizer_codec(s.artifacts, self.manifest)
        self.head = self._start(Head(client=self._client(f"head-{s.cluster}"), manifest=self.manifest,
                                     encode=encode, decode=decode, encode_chat=encode_chat, rss_mb=system.rss_mb,
                                     settings=HeadSettings(cluster=s.cluster, max_sessions=s.max_sessions,
                                                           max_tokens=s.max_tokens, rate=s.rate, burst=s.burst,
                                                           prefill_chunk=s.prefill_chunk, ring=s.ring)))
        planner_ = self.planner
        self.head.also_rejected = lambda: planner_.rejected  # the head's telemetry counts the whole hub
        if s.http_port is not None:  # a client of the cluster like any other, with the hub's login to follow it
            gateway = GatewaySettings(broker_url=self.url, cluster=s.cluster, **self._login)
            self.http = self._start(GatewayProcess(gateway, host=s.http_host, port=s.http_port))
        log.info("hub started", url=self.url, cluster=s.cluster, model=self.manifest.name,
                 chat_template=self.manifest.chat_template is not None)
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
        client = MqttClient(url=self.url, client_id=client_id, **self._login).start()
        self._clients.append(client)
        return client

    def _start(self, part):
        part.start()
        if hasattr(part, "stop"):
            self._parts.append(part)
        return part
