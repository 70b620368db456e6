"""Users, roles and ACLs on the embedded broker, and the same rules on mosquitto.

A cluster's users (broker/users.py) log in with a password; what each may publish and read
follows from its role and the topic namespace (broker/acl.py). The attacks here are the
ones a home cluster meets: a stranger without a password, a wrong password, a node posing
as another, a client injecting activations or reading someone else's answers, and retained
state read past the ACL. The same scenario runs on mosquitto with the exported files.
"""

from __future__ import annotations

import queue
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import structlog

from linguamq import topics as T
from linguamq.broker import BrokerThread, EmbeddedBroker, TlsListener
from linguamq.broker.acl import secured
from linguamq.broker.tls import write_certificates
from linguamq.broker.users import HUB_USERNAME, Credentials, User, hash_password
from linguamq.tools.chaos import security as S
from linguamq.tools.chaos.case import ChaosContext
from linguamq.topics.client import MqttClient, MqttError, MqttTimeout

CLUSTER = "home"
PASSWORDS = {"admin": "admin-pw", "n1": "n1-pw", "n2": "n2-pw", "alice": "alice-pw", "bob": "bob-pw"}
ROLES = {"admin": "hub", "n1": "node", "n2": "node", "alice": "client", "bob": "client"}
SHA = "ab" * 32
NOT_AUTHORIZED, CLIENT_ID_REJECTED = 135, 133  # paho's v5 names for CONNACK 5 and 2



@pytest.fixture(autouse=True, scope="module")
def _fresh_logging() -> Iterator[None]:
    # A test that ran `linguamq ...` in-process (cli.main) left structlog printing to that
    # test's captured stderr, closed since: log lines from our threads would raise there.
    structlog.reset_defaults()
    yield
    structlog.reset_defaults()


@pytest.fixture(scope="module")
def users() -> dict[str, User]:
    return {name: User(name, ROLES[name], hash_password(pw)) for name, pw in PASSWORDS.items()}


@pytest.fixture
def secured_broker(custom_broker, users):
    """(running embedded broker with the users and ACLs, login(name, client_id=None) -> Peer)."""
    running, peer = custom_broker(**secured(Credentials(users, hub_secret="hub-secret")))
    return running, _login_with(peer)


def _login_with(peer: Callable[..., object]) -> Callable[..., object]:
    def login(name: str | None, client_id: str | None = None, *, password: str | None = None,
              expect_success: bool = True):
        p = peer(client_id or f"c-{name}", connect=False)
        if name is not None:
            p.client.username_pw_set(name, password if password is not None else PASSWORDS.get(name, "x"))
        code = p.connect(expect_success=expect_success)
        return p if expect_success else code
    return login


def t(topic: T.Topic, **params: str | int) -> str:
    return topic.build(CLUSTER, **params)


def test_anonymous_and_wrong_passwords_are_refused_at_connect(secured_broker) -> None:
    _, login = secured_broker
    assert login(None, "stranger", expect_success=False) == NOT_AUTHORIZED
    assert login("n1", "n1-guess", password="wrong", expect_success=False) == NOT_AUTHORIZED
    assert login("mallory", password="anything", expect_success=False) == NOT_AUTHORIZED  # no such user
    assert login(HUB_USERNAME, "fake-hub", password="guess", expect_success=False) == NOT_AUTHORIZED
    login("n1")  # the right password
    login(HUB_USERNAME, "hub-home", password="hub-secret")  # the hub's in-memory credential


def test_a_refused_connect_cannot_knock_a_client_off(secured_broker) -> None:
    # amqtt closed the client holding an id before checking the newcomer's password.
    _, login = secured_broker
    n1 = login("n1", "node-n1")
    assert login(None, "node-n1", expect_success=False) == NOT_AUTHORIZED
    assert login("n1", "node-n1", password="wrong", expect_success=False) == NOT_AUTHORIZED
    # Another user may not take the id over either (it would disconnect n1).
    assert login("alice", "node-n1", expect_success=False) == CLIENT_ID_REJECTED
    assert not n1.disconnected.is_set()
    n1.subscribe(t(T.NODE_PROBE, node="n1"))
    n1.publish(t(T.NODE_PROBE, node="n1"), b"still here", qos=1)
    assert n1.receive().payload == b"still here"


def test_a_node_cannot_register_a_will_on_another_nodes_status(secured_broker) -> None:
    running, _ = secured_broker
    assert _connect_with_will(running.port, "n2", t(T.NODE_STATUS, node="n1")) == NOT_AUTHORIZED
    assert _connect_with_will(running.port, "n2", t(T.NODE_STATUS, node="n2")) == 0


def _connect_with_will(port: int, name: str, will_topic: str) -> int:
    answers: queue.Queue[int] = queue.Queue()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"will-{name}-{will_topic[-6:]}",
                         protocol=mqtt.MQTTv311)
    client.username_pw_set(name, PASSWORDS[name])
    client.will_set(will_topic, b"offline", qos=1, retain=True)
    client.on_connect = lambda c, u, flags, rc, props: answers.put(rc.value)
    client.reconnect_delay_set(30, 60)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        return answers.get(timeout=5)
    finally:
        client.disconnect()
        client.loop_stop()


# --- one scenario, two brokers (tools/chaos/security.py) ----------------------------------------


@pytest.fixture
def ctx(tmp_path: Path) -> ChaosContext:
    return ChaosContext(artifacts=tmp_path, workdir=tmp_path)  # broker cases need no model


def test_roles_limit_what_each_user_reads_and_publishes(users) -> None:
    with BrokerThread(broker=EmbeddedBroker(**secured(Credentials(users)))) as running:
        retained, live = S.run_roles(S.login_to(running.url))
    assert {u: set(seen) for u, seen in retained.items()} == S.RETAINED_SEEN  # no retained leak
    assert all(p != "retained by bob" for seen in retained.values() for p in seen.values())  # plan kept
    assert live == S.LIVE  # each message reached exactly the users its table row names


def test_the_embedded_acl_case_refuses_every_attack(ctx: ChaosContext) -> None:
    c = S.embedded_acl(ctx).counts
    assert c.bad_connects == 4 + 10 and c.refused_connects == c.bad_connects, c  # 4 strangers, 10 guesses
    assert c.holder_connected, c  # another user's try at its client id did not knock it off
    assert c.attacks > 0 and c.dropped == c.attacks, c
    assert (c.leaked, c.missing) == (0, 0), c


@pytest.mark.integration
def test_mosquitto_with_the_exported_files_enforces_the_same_rules(ctx: ChaosContext) -> None:
    c = S.mosquitto_parity(ctx).counts
    assert c.outcomes == len(S.LIVE) + len(S.RETAINED_SEEN) and c.identical == c.outcomes, c
    assert c.refused_logins == c.bad_logins == 2, c
    assert c.attacks > 0 and c.dropped == c.attacks and (c.leaked, c.missing) == (0, 0), c


# --- TLS -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("certs")
    write_certificates(root, [])
    return root


def test_tls_only_refuses_plaintext_and_serves_clients_that_trust_its_ca(certs: Path, users) -> None:
    tls = TlsListener(cert=str(certs / "server.crt"), key=str(certs / "server.key"), port=0, only=True)
    broker = EmbeddedBroker(tls=tls, connect_timeout=2.0, **secured(Credentials(users)))
    with BrokerThread(broker=broker) as running:
        assert running.url.startswith("mqtts://") and running.url == running.tls_url
        with pytest.raises(MqttTimeout):  # plaintext MQTT on the TLS port never gets a CONNACK
            MqttClient(url=running.url.replace("mqtts://", "mqtt://"), client_id="plain",
                       username="n1", password=PASSWORDS["n1"]).start(timeout=1.5)
        with pytest.raises(MqttError, match="CERTIFICATE_VERIFY_FAILED"):  # no --cafile: system CAs
            MqttClient(url=running.url, client_id="no-ca", username="n1", password=PASSWORDS["n1"]).start(2)
        with pytest.raises(MqttError, match="not authorized"):  # TLS is not a login
            MqttClient(url=running.url, client_id="anon", cafile=str(certs / "ca.crt")).start(2)
        client = MqttClient(url=running.url, client_id="n1", cafile=str(certs / "ca.crt"), username="n1",
                            password=PASSWORDS["n1"]).start(5)
        try:
            got: list[bytes] = []
            probe = t(T.NODE_PROBE, node="n1")
            client.subscribe(T.NODE_PROBE, probe, lambda _t, payload, _r: got.append(payload), wait=5)
            client.publish_raw(probe, b"over tls", qos=1, wait=5)
            deadline = time.monotonic() + 5
            while not got and time.monotonic() < deadline:
                time.sleep(0.01)
            assert got == [b"over tls"]
        finally:
            client.stop()


def test_tls_beside_plaintext_listens_on_both(certs: Path) -> None:
    tls = TlsListener(cert=str(certs / "server.crt"), key=str(certs / "server.key"), port=0)
    with BrokerThread(broker=EmbeddedBroker(tls=tls)) as running:
        assert running.url.startswith("mqtt://") and running.tls_url.startswith("mqtts://")
        assert running.tls_port != running.port
        for url in (running.url, running.tls_url):
            MqttClient(url=url, client_id="both", cafile=str(certs / "ca.crt")).start(5).stop()


@pytest.mark.integration
def test_pub_and_sub_log_in_with_mosquittos_flags(certs: Path, users) -> None:
    tls = TlsListener(cert=str(certs / "server.crt"), key=str(certs / "server.key"), port=0)
    with BrokerThread(broker=EmbeddedBroker(tls=tls, **secured(Credentials(users)))) as running:
        base = ["-h", "127.0.0.1", "-p", str(running.tls_port), "--cafile", str(certs / "ca.crt")]
        probe = t(T.NODE_PROBE, node="n1")
        sub = subprocess.Popen(LINGUAMQ + ["sub", *base, "-u", "n1", "-P", PASSWORDS["n1"], "-t", probe, "-C", "1",
                                           "-W", "20", "-v"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, text=True)
        try:
            deadline = time.monotonic() + 15  # published until the subscriber (starting up) gets one
            while sub.poll() is None and time.monotonic() < deadline:
                pub = _run(["pub", *base, "-u", "n1", "-P", PASSWORDS["n1"], "-t", probe, "-m", "hi", "-q", "1"])
                assert pub.returncode == 0, pub.stderr
                time.sleep(0.3)
            out, err = sub.communicate(timeout=10)
        finally:
            if sub.poll() is None:
                sub.kill()
                sub.communicate(timeout=5)
        assert (sub.returncode, out.splitlines()[0]) == (0, f"{probe} hi"), err
        wrong = ["pub", *base, "-u", "n1", "-P", "wrong", "-t", probe, "-m", "x"]
        ours, theirs = _run(wrong), subprocess.run(["mosquitto_pub", *wrong[1:]], capture_output=True, text=True,
                                                   timeout=20, stdin=subprocess.DEVNULL)
        assert ours.returncode == theirs.returncode == 5  # "Connection Refused: not authorised."
        assert ours.stderr == theirs.stderr


LINGUAMQ = [sys.executable, "-m", "linguamq.tools.cli"]


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(LINGUAMQ + args, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
