"""A secured cluster under attack: users file, roles, ACLs and a TLS-only listener.

One hub (`--users`, `--tls-only`) and two node processes, each logged in as its own user;
clients `alice` and `bob`; `admin` (hub role) watches. Every attack is something a user
would notice if it worked: a stranger connecting, a node's status forged, an assignment or
another client's answers read, activations injected into the pipeline.
The same rules on mosquitto (exported files) are compared in tests/broker/test_auth_acl.py.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as paho
import pytest
import structlog

from linguamq import topics
from linguamq.broker.tls import write_certificates
from linguamq.broker.users import User, hash_password, save_users
from linguamq.client import generate_remote, new_request_id
from linguamq.hub.blobs import BlobServer
from linguamq.node.blobs import BlobCache, BlobError
from linguamq.schemas.cluster import NodeStatus
from linguamq.schemas.requests import ErrorReport, GenerateRequest
from linguamq.tools.testing.cluster import LocalCluster, NodeSpec, linguamq_argv
from linguamq.topics.client import MqttClient, MqttError, MqttTimeout

pytestmark = [pytest.mark.integration, pytest.mark.slow]

CLUSTER = "sec"
PASSWORDS = {"admin": "admin-pw", "n1": "n1-pw", "n2": "n2-pw", "alice": "alice-pw", "bob": "bob-pw"}
ROLES = {"admin": "hub", "n1": "node", "n2": "node", "alice": "client", "bob": "client"}
PROMPT = "Hello world"
WAIT = 10.0



@pytest.fixture(autouse=True, scope="module")
def _fresh_logging() -> Iterator[None]:
    # A test that ran `linguamq ...` in-process (cli.main) left structlog printing to that
    # test's captured stderr, closed since: log lines from our threads would raise there.
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


class Secure:
    def __init__(self, cluster: LocalCluster, admin: MqttClient, certs: Path, art: Path) -> None:
        self.cluster, self.admin, self.certs, self.art = cluster, admin, certs, art
        self.url = cluster.url

    def client(self, name: str | None, client_id: str, *, password: str | None = None,
               url: str | None = None) -> MqttClient:
        login = {} if name is None else {"username": name, "password": password or PASSWORDS[name]}
        return MqttClient(url=url or self.url, client_id=client_id, cafile=str(self.certs / "ca.crt"), **login)

    def generate(self, name: str, max_tokens: int = 12):
        with self.client(name, f"gen-{name}-{new_request_id()[1:7]}") as client:
            request = GenerateRequest(id=new_request_id(), prompt=PROMPT, max_tokens=max_tokens)
            return generate_remote(client, CLUSTER, request, timeout=60)

    def mark(self, topic: str) -> None:
        """Something ``topic``'s reader may receive, published by the hub role after the attack."""
        self.admin.publish_raw(topic, b"marker", qos=1, wait=WAIT)


@pytest.fixture(scope="module")
def secure(artifacts, tmp_path_factory) -> Iterator[Secure]:
    root = tmp_path_factory.mktemp("secure")
    save_users(root / "users", [User(n, ROLES[n], hash_password(pw)) for n, pw in PASSWORDS.items()])
    certs = root / "certs"
    write_certificates(certs, [])
    nodes = [NodeSpec(n, password=PASSWORDS[n], args=("--cafile", str(certs / "ca.crt"))) for n in ("n1", "n2")]
    hub_args = ("--users", str(root / "users"), "--tls-cert", str(certs / "server.crt"), "--tls-key",
                str(certs / "server.key"), "--tls-port", "0", "--tls-only")
    with LocalCluster(artifacts=artifacts["llama"], nodes=nodes, workdir=root, cluster=CLUSTER,
                      objective="even", hub_args=hub_args) as cluster:
        assert cluster.url.startswith("mqtts://")
        admin = MqttClient(url=cluster.url, client_id="admin", cafile=str(certs / "ca.crt"), username="admin",
                           password=PASSWORDS["admin"]).start(WAIT)
        try:
            cluster.wait_ready(admin, nodes=2, timeout=90)
            yield Secure(cluster, admin, certs, artifacts["llama"])
        finally:
            admin.stop()


def test_nodes_and_a_client_work_under_their_roles_over_tls(secure: Secure, reference) -> None:
    result = secure.generate("alice")
    assert result.error is None
    assert result.tokens == reference(secure.art, PROMPT, 12)


def test_generate_command_logs_in_with_username_and_cafile(secure: Secure, reference) -> None:
    env = {**os.environ, "LINGUAMQ_PASSWORD": PASSWORDS["bob"]}
    out = subprocess.run(linguamq_argv("--log-level", "warning", "generate", "--broker", secure.url, "--cluster",
                                       CLUSTER, "-u", "bob", "--cafile", str(secure.certs / "ca.crt"),
                                       "--prompt", PROMPT, "--max-tokens", "12", "--json"),
                         env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["tokens"] == list(reference(secure.art, PROMPT, 12))


def test_anonymous_wrong_password_and_plaintext_are_refused(secure: Secure) -> None:
    with pytest.raises(MqttError, match="not authorized"):
        secure.client(None, "stranger").start(WAIT)
    with pytest.raises(MqttError, match="not authorized"):
        secure.client("alice", "guesser", password="123456").start(WAIT)
    with pytest.raises(MqttTimeout):  # --tls-only: plaintext MQTT on the port gets no CONNACK
        MqttClient(url=secure.url.replace("mqtts://", "mqtt://"), client_id="plain", username="alice",
                   password=PASSWORDS["alice"]).start(2)
    env = {**os.environ, "LINGUAMQ_PASSWORD": "wrong"}
    out = subprocess.run(linguamq_argv("--log-level", "error", "generate", "--broker", secure.url, "--cluster",
                                       CLUSTER, "-u", "alice", "--cafile", str(secure.certs / "ca.crt"),
                                       "--prompt", PROMPT), env=env, capture_output=True, text=True, timeout=60,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 2 and "not authorized: check --username/--password" in out.stderr


def _collect(client: MqttClient, filters: list[str]) -> queue.Queue[paho.MQTTMessage]:
    inbox: queue.Queue[paho.MQTTMessage] = queue.Queue()
    for f in filters:
        client.subscribe_raw(f, inbox.put, qos=1, wait=WAIT)
    return inbox


def _until(inbox: queue.Queue[paho.MQTTMessage], marker: str) -> list[paho.MQTTMessage]:
    got = []
    while (msg := inbox.get(timeout=WAIT)).topic != marker:
        got.append(msg)
    return got


def test_a_node_impersonating_another_gets_nothing_through(secure: Secure) -> None:
    n1_status = topics.NODE_STATUS.build(CLUSTER, node="n1")
    evil_marker = topics.NODE_CONTROL.build(CLUSTER, node="n2")  # n2 may read it
    with secure.client("admin", "status-watch") as watcher, secure.client("n2", "evil-n2") as evil:
        watched = _collect(watcher, [n1_status, "sync/status-watch"])  # the hub role reads anything
        assert NodeStatus.from_json(watched.get(timeout=WAIT).payload).state == "ready"  # retained
        inbox = _collect(evil, [topics.NODE_ASSIGN.filter(CLUSTER), topics.NODE_STATUS.filter(CLUSTER),
                                topics.PLAN.filter(CLUSTER), evil_marker])
        forged = NodeStatus(node="n1", state="offline", epoch=0, ts=time.time())
        evil.publish(topics.NODE_STATUS, n1_status, forged, wait=WAIT)  # a will-like "n1 left"
        evil.publish_raw(topics.NODE_ASSIGN.build(CLUSTER, node="n1"), b"{}", qos=1, wait=WAIT)
        secure.mark(evil_marker)
        secure.mark("sync/status-watch")
        # n2 reads its own assignment (retained) and nothing of n1's, nor statuses, nor the plan.
        assert [m.topic for m in _until(inbox, evil_marker)] == [topics.NODE_ASSIGN.build(CLUSTER, node="n2")]
        assert [NodeStatus.from_json(m.payload).state for m in _until(watched, "sync/status-watch")
                if m.topic == n1_status] in ([], ["ready"])  # the forged "offline" never arrived
    assert secure.generate("alice", max_tokens=4).error is None  # n1 still serves


def test_a_client_publishing_activations_is_dropped(secure: Secure, reference) -> None:
    reports: queue.Queue[ErrorReport] = queue.Queue()
    errors = topics.ERRORS.filter(CLUSTER)
    secure.admin.subscribe(topics.ERRORS, errors, lambda _t, r, _r: reports.put(r), wait=WAIT)
    try:
        with secure.client("alice", "alice-injects") as alice:
            for piece in range(3):
                alice.publish_raw(topics.ACT.build(CLUSTER, piece=piece), b"LMQ1 garbage", qos=1, wait=WAIT)
        result = secure.generate("alice")
        assert result.tokens == reference(secure.art, PROMPT, 12)  # the pipeline output is unaffected
        assert [r for r in _drain(reports) if "/act/" in r.topic] == []  # no node ever saw it
        # The control: the same garbage from a role that may publish activations is seen and reported.
        secure.admin.publish_raw(topics.ACT.build(CLUSTER, piece=0), b"LMQ1 garbage", qos=1, wait=WAIT)
        report = reports.get(timeout=WAIT)
        assert "/act/0" in report.topic and report.reporter in ("n1", "n2")
    finally:
        secure.admin.unsubscribe(errors)


def _drain(q: queue.Queue) -> list:
    time.sleep(0.3)
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


def test_a_client_reads_neither_other_clients_answers_nor_retained_state(secure: Secure) -> None:
    marker = topics.ERRORS.build(CLUSTER, client="bob")  # bob may read his own errors
    with secure.client("bob", "bob-snoops") as bob:
        inbox = _collect(bob, [f"{topics.ROOT}/#", marker])  # everything, retained included
        results: list = []
        thread = threading.Thread(target=lambda: results.append(secure.generate("alice")))
        thread.start()
        thread.join(90)
        assert results and results[0].error is None and results[0].tokens
        secure.mark(marker)
        assert _until(inbox, marker) == []  # no token, no status, assignment, plan or manifest
    with secure.client("alice", "alice-reads") as alice:  # while alice reads her own errors
        inbox = _collect(alice, [topics.ERRORS.build(CLUSTER, client="alice")])
        secure.mark(topics.ERRORS.build(CLUSTER, client="alice"))
        assert inbox.get(timeout=WAIT).payload == b"marker"


def test_a_downloaded_piece_that_does_not_match_the_manifest_is_refused(tmp_path: Path) -> None:
    # The cached-file case is tests/integration/test_pipeline.py::test_a_corrupted_cached_piece_is_fetched_again;
    # here the bytes served are wrong (a hostile or broken hub): the node refuses them, keeps nothing.
    from linguamq.broker import BrokerThread
    served = tmp_path / "served"
    served.write_bytes(b"not the piece the manifest names" * 100)
    sha = "cd" * 32
    with BrokerThread() as broker, MqttClient(url=broker.url, client_id="hub") as hub, \
            MqttClient(url=broker.url, client_id="n1") as node:
        BlobServer(client=hub, cluster=CLUSTER, files={sha: served}, reporter="hub").start()
        cache = BlobCache(root=tmp_path / "cache", client=node, cluster=CLUSTER, node="n1", timeout=5)
        with pytest.raises(BlobError, match="do not match the manifest"):
            cache.ensure(sha)
        assert not cache.has(sha) and list((tmp_path / "cache").iterdir()) == []


def test_the_secured_cluster_case_blocks_every_attack(artifacts, tmp_path: Path) -> None:
    from linguamq.tools.chaos import security as chaos_security
    from linguamq.tools.chaos.case import ChaosContext
    outcome = chaos_security.secured_cluster(ChaosContext(artifacts=artifacts["llama"], workdir=tmp_path))
    c = outcome.counts
    assert len(c.blocked) == 8 and [a for a, blocked in c.blocked.items() if not blocked] == [], outcome
    assert c.identical == c.generations == 2, outcome
