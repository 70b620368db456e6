"""Security cases (issue 7, point 5): users, roles, ACLs and TLS under attack.

- ``embedded ACL``: the embedded broker with a users file: strangers, wrong passwords, a
  forged hub credential and a stolen client id are refused at CONNECT; then every user
  watches ``lmq/#`` while nodes and clients try what their role forbids (``LIVE``) and
  retained state waits to leak (``RETAINED``).
- ``mosquitto parity``: the same scenario on mosquitto 2 with the files
  `linguamq users export-mosquitto` writes: the same messages get through.
- ``secured cluster``: a real hub (`--users --tls-only`) and two nodes logged in as
  themselves: a client's generation is token-identical to run-local over TLS, while
  plaintext, strangers, an impersonating node, injected activations and a snooping client
  get nothing through.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as paho

from linguamq import topics as T
from linguamq.broker.acl import mosquitto_acl, secured
from linguamq.broker.embedded import BrokerThread, EmbeddedBroker
from linguamq.broker.tls import write_certificates
from linguamq.broker.users import HUB_USERNAME, Credentials, User, hash_password, save_users
from linguamq.client import generate_remote, new_request_id
from linguamq.schemas.requests import ErrorReport, GenerateRequest
from linguamq.tools.chaos.case import Case, ChaosContext, Outcome
from linguamq.tools.testing.cluster import LocalCluster, NodeSpec
from linguamq.tools.testing.mosquitto import mosquitto
from linguamq.topics.client import MqttClient, MqttError, MqttTimeout

CLUSTER = "home"
PASSWORDS = {"admin": "admin-pw", "n1": "n1-pw", "n2": "n2-pw", "alice": "alice-pw", "bob": "bob-pw"}
ROLES = {"admin": "hub", "n1": "node", "n2": "node", "alice": "client", "bob": "client"}
WAIT = 10.0
_SHA = "ab" * 32


def _t(topic: T.Topic, **params: str | int) -> str:
    return topic.build(CLUSTER, **params)


RETAINED = [  # (publisher, topic), retained, published before anyone watches
    ("admin", _t(T.MODEL)), ("admin", _t(T.PLAN)), ("admin", _t(T.NODE_ASSIGN, node="n1")),
    ("admin", _t(T.NODE_ASSIGN, node="n2")), ("n1", _t(T.NODE_STATUS, node="n1")),
    ("bob", _t(T.PLAN)),  # a client trying to replace the retained plan
]
RETAINED_SEEN = {  # what each user watching `lmq/#` gets of them
    "admin": {_t(T.MODEL), _t(T.PLAN), _t(T.NODE_ASSIGN, node="n1"), _t(T.NODE_ASSIGN, node="n2"),
              _t(T.NODE_STATUS, node="n1")},
    "n1": {_t(T.MODEL), _t(T.NODE_ASSIGN, node="n1")},
    "n2": {_t(T.MODEL), _t(T.NODE_ASSIGN, node="n2")},
    "alice": set(), "bob": set(),
}
LIVE = [  # (publisher, topic, the users watching `lmq/#` that receive it)
    ("n2", _t(T.NODE_STATUS, node="n1"), set()),  # a node impersonating another
    ("n2", _t(T.NODE_TELEMETRY, node="n1"), set()),
    ("n2", _t(T.NODE_STATUS, node="n2"), {"admin"}),
    ("admin", _t(T.NODE_ASSIGN, node="n1"), {"admin", "n1"}),  # n2 does not read n1's assignment
    ("alice", _t(T.ACT, piece=0), set()),  # a client injecting activations
    ("alice", _t(T.SESSION_OUT, session="s1"), set()),  # ... or tokens
    ("admin", _t(T.ACT, piece=0), {"admin", "n1", "n2"}),
    ("n1", _t(T.SESSION_OUT, session="s1"), {"admin"}),
    ("alice", _t(T.REQUESTS_FROM, client="alice"), {"admin"}),
    ("alice", _t(T.REQUESTS_FROM, client="bob"), set()),  # a request in another client's name
    ("alice", _t(T.REQUESTS), set()),
    ("alice", _t(T.CANCEL_FROM, client="alice"), {"admin"}),
    ("alice", _t(T.CANCEL_FROM, client="bob"), set()),  # cancelling another client's request
    ("alice", _t(T.CANCEL), set()),
    ("admin", _t(T.CLIENT_RESPONSES, client="alice", request="r1"), {"admin", "alice"}),  # not bob
    ("admin", _t(T.RESPONSES, request="r1"), {"admin"}),
    ("admin", _t(T.ERRORS, client="bob"), {"admin", "bob"}),
    ("n1", _t(T.ERRORS, client="n2"), set()),
    ("n1", _t(T.BLOB_REQUEST, sha256=_SHA), {"admin"}),
    ("admin", _t(T.BLOB_CHUNK, sha256=_SHA, node="n1"), {"admin", "n1"}),
    ("admin", _t(T.PING, node="n2"), {"admin", "n2"}),
    ("n2", _t(T.PONG, client="trace-1"), {"admin"}),
    ("bob", "elsewhere/topic", set()),  # not ours: the hub role only
]
MARKER = {  # a topic each watcher may read: the hub marks the end of a phase there
    "admin": "sync/admin", "n1": _t(T.NODE_CONTROL, node="n1"), "n2": _t(T.NODE_CONTROL, node="n2"),
    "alice": _t(T.ERRORS, client="alice"), "bob": _t(T.ERRORS, client="bob"),
}


def make_users() -> dict[str, User]:
    return {name: User(name, ROLES[name], hash_password(pw)) for name, pw in PASSWORDS.items()}


Login = Callable[..., MqttClient]  # login(name, client_id) -> a started MqttClient


def login_to(url: str, *, cafile: str | None = None) -> Login:
    def login(name: str | None, client_id: str, *, password: str | None = None) -> MqttClient:
        username, password = (None, None) if name is None else (name, password or PASSWORDS[name])
        return MqttClient(url=url, client_id=client_id, cafile=cafile, username=username,
                          password=password).start(WAIT)
    return login


def run_roles(login: Login) -> tuple[dict[str, dict[str, str]], list[tuple[str, str, set[str]]]]:
    """Publish RETAINED, then let every user watch `lmq/#` while LIVE is published.
    Returns ({user: {retained topic: payload}}, [(publisher, topic, the users that got it)])."""
    with contextlib.ExitStack() as stack:
        pubs = {n: stack.enter_context(contextlib.closing(_Closing(login(n, f"pub-{n}")))).client
                for n in PASSWORDS}
        for name, topic in RETAINED:
            pubs[name].publish_raw(topic, f"retained by {name}".encode(), qos=1, retain=True, wait=WAIT)
        inboxes: dict[str, queue.Queue] = {}
        for name in PASSWORDS:
            watcher = stack.enter_context(contextlib.closing(_Closing(login(name, f"watch-{name}")))).client
            inboxes[name] = queue.Queue()
            for f in (f"{T.ROOT}/#", MARKER[name]):
                watcher.subscribe_raw(f, inboxes[name].put, qos=1, wait=WAIT)
        retained = {}
        for name, inbox in inboxes.items():
            pubs["admin"].publish_raw(MARKER[name], b"retained-done", qos=1, wait=WAIT)
            retained[name] = {m.topic: bytes(m.payload).decode()
                              for m in _until(inbox, MARKER[name], b"retained-done") if m.retain}
        for index, (name, topic, _) in enumerate(LIVE):
            pubs[name].publish_raw(topic, f"live {index}".encode(), qos=1, wait=WAIT)
        got = {}
        for name, inbox in inboxes.items():
            pubs["admin"].publish_raw(MARKER[name], b"live-done", qos=1, wait=WAIT)
            got[name] = {bytes(m.payload).decode() for m in _until(inbox, MARKER[name], b"live-done") if not m.retain}
        live = [(n, topic, {w for w, seen in got.items() if f"live {i}" in seen})
                for i, (n, topic, _) in enumerate(LIVE)]
    # The watchers' subscriptions ended with their connections; retained state stays with the broker.
    return retained, live


class _Closing:
    def __init__(self, client: MqttClient) -> None:
        self.client = client

    def close(self) -> None:
        self.client.stop()


def _until(inbox: queue.Queue[paho.MQTTMessage], marker: str, payload: bytes = b"x-done") -> list[paho.MQTTMessage]:
    """Messages before ``payload`` on ``marker``; markers (a copy per matching filter) left out."""
    out: list[paho.MQTTMessage] = []
    while True:
        msg = inbox.get(timeout=WAIT)
        if msg.topic == marker and bytes(msg.payload).endswith(b"-done"):
            if bytes(msg.payload) == payload:
                return out
            continue
        out.append(msg)


def score(retained: dict[str, dict[str, str]],
          live: list[tuple[str, str, set[str]]]) -> tuple[int, int, int, int]:
    """(attacks refused, attacks, messages leaked or forged, legitimate deliveries missing)."""
    expected = {(n, t): r for n, t, r in LIVE}
    attacks = [(n, t) for n, t, r in LIVE if n != "admin" and not r] + [("bob", t) for n, t in RETAINED if n == "bob"]
    refused = sum(1 for n, t, r in live if (n, t) in attacks and not r)
    refused += sum(1 for n, t in RETAINED if n == "bob" and not any(
        p == "retained by bob" for seen in retained.values() for p in seen.values()))
    leaked = sum(len(r - expected[(n, t)]) for n, t, r in live)
    leaked += sum(len(set(retained.get(u, {})) - seen) for u, seen in RETAINED_SEEN.items())
    leaked += sum(1 for seen in retained.values() for p in seen.values() if p == "retained by bob")
    missing = sum(len(expected[(n, t)] - r) for n, t, r in live)
    missing += sum(len(seen - set(retained.get(u, {}))) for u, seen in RETAINED_SEEN.items())
    return refused, len(attacks), leaked, missing


def connack(port: int, client_id: str, username: str, password: str) -> tuple[int, float]:
    """(CONNACK return code, ms from CONNECT sent to CONNACK read) of a bare MQTT 3.1.1 login."""
    def string(data: bytes) -> bytes:
        return len(data).to_bytes(2, "big") + data
    body = string(b"MQTT") + bytes([4, 0xC2]) + (30).to_bytes(2, "big")  # user, password, clean session
    body += string(client_id.encode()) + string(username.encode()) + string(password.encode())
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        t0 = time.perf_counter()
        sock.sendall(bytes([0x10, len(body)]) + body)
        answer = b""
        while len(answer) < 4:
            chunk = sock.recv(4 - len(answer))
            if not chunk:
                raise MqttError("the broker closed the connection without a CONNACK")
            answer += chunk
        return answer[3], (time.perf_counter() - t0) * 1e3


def _refused(attempt: Callable[[], MqttClient]) -> bool:
    try:
        attempt().stop()
    except MqttError:
        return True
    return False


# --- embedded broker ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class AclCounts:
    bad_connects: int  # CONNECTs that must be refused
    refused_connects: int
    holder_connected: bool  # the client whose id was tried by another user is still connected
    attacks: int  # forbidden publishes (retained included)
    dropped: int  # of those, delivered to nobody
    leaked: int  # messages delivered to a user who may not read them
    missing: int  # legitimate deliveries that did not happen

    @property
    def ok(self) -> bool:
        return (self.refused_connects == self.bad_connects and self.holder_connected and self.dropped == self.attacks
                and self.leaked == self.missing == 0)

    def observed(self) -> str:
        return (f"{self.refused_connects}/{self.bad_connects} CONNECTs refused (the node holding the id stayed "
                f"{'connected' if self.holder_connected else 'DISCONNECTED'}); {self.dropped}/{self.attacks} attacks "
                f"dropped; {self.leaked} messages leaked; {self.missing} legitimate deliveries missing")


def embedded_acl(ctx: ChaosContext) -> Outcome[AclCounts]:
    credentials = Credentials(make_users(), hub_secret="hub-secret-of-this-run")
    guesses = 100 if ctx.full else 10
    with BrokerThread(broker=EmbeddedBroker(**secured(credentials))) as running:
        login = login_to(running.url)
        holder = login("n1", "node-n1")
        try:
            strangers = [lambda: login(None, "stranger"), lambda: login("mallory", "m", password="x"),
                         lambda: login(HUB_USERNAME, "fake-hub", password="guess"),
                         lambda: login("alice", "node-n1")]  # another user's client id
            refused_connects = sum(_refused(a) for a in strangers)
            times = []
            for i in range(guesses):  # password guessing: CONNECT to CONNACK, PBKDF2 included
                code, ms = connack(running.port, f"guess-{i}", "n1", f"guess{i}")
                refused_connects += code == 5
                times.append(ms)
            holder_alive = holder.connected
        finally:
            holder.stop()
        retained, live = run_roles(login)
    refused, attacks, leaked, missing = score(retained, live)
    connects = len(strangers) + guesses
    counts = AclCounts(bad_connects=connects, refused_connects=refused_connects, holder_connected=holder_alive,
                       attacks=attacks, dropped=refused, leaked=leaked, missing=missing)
    return Outcome(case="embedded ACL",
                   injected=f"{connects} bad CONNECTs (anonymous, unknown user, forged hub secret, another user's "
                            f"client id, {guesses} password guesses); {attacks} forbidden publishes (node as another "
                            "node, client activations/tokens/requests in another's name); 5 users watching lmq/# "
                            "with retained model/plan/assign/status",
                   counts=counts,
                   figure=f"{statistics.median(times):.0f} ms from CONNECT to CONNACK 5 per password guess "
                          "(PBKDF2-SHA512, 40,000 iterations)")


# --- mosquitto with the exported files ----------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParityCounts:
    outcomes: int  # live messages and users' retained views compared
    identical: int  # of those, the same on mosquitto as on the embedded broker
    bad_logins: int  # on mosquitto
    refused_logins: int
    attacks: int  # forbidden publishes, on mosquitto
    dropped: int
    leaked: int
    missing: int

    @property
    def ok(self) -> bool:
        return (self.identical == self.outcomes and self.refused_logins == self.bad_logins
                and self.dropped == self.attacks and self.leaked == self.missing == 0)

    def observed(self) -> str:
        return (f"{self.identical}/{self.outcomes} outcomes identical to the embedded broker's; on mosquitto "
                f"{self.dropped}/{self.attacks} attacks dropped, {self.leaked} leaked, {self.refused_logins}/"
                f"{self.bad_logins} bad logins refused")


def mosquitto_parity(ctx: ChaosContext) -> Outcome[ParityCounts]:
    users = make_users()
    root = Path(tempfile.mkdtemp(prefix="mosq-", dir=ctx.workdir))
    save_users(root / "users", users.values())
    (root / "password_file").write_text("".join(f"{u.name}:{u.password_hash}\n" for u in users.values()))
    (root / "acl_file").write_text(mosquitto_acl(ROLES))
    with BrokerThread(broker=EmbeddedBroker(**secured(Credentials(users)))) as running:
        ours = run_roles(login_to(running.url))
    with mosquitto(f"allow_anonymous false\npassword_file {root / 'password_file'}\n"
                   f"acl_file {root / 'acl_file'}\n", root=root) as port:
        login = login_to(f"mqtt://127.0.0.1:{port}")
        strangers_refused = _refused(lambda: login(None, "stranger")) + _refused(
            lambda: login("n1", "guess", password="wrong"))
        theirs = run_roles(login)
    same = sum(1 for a, b in zip(ours[1], theirs[1], strict=True) if a == b)
    same += sum(1 for u in RETAINED_SEEN if ours[0][u] == theirs[0][u])
    total = len(LIVE) + len(RETAINED_SEEN)
    refused, attacks, leaked, missing = score(*theirs)
    counts = ParityCounts(outcomes=total, identical=same, bad_logins=2, refused_logins=strangers_refused,
                          attacks=attacks, dropped=refused, leaked=leaked, missing=missing)
    return Outcome(case="mosquitto parity",
                   injected=f"the embedded ACL scenario on mosquitto 2 with `users export-mosquitto`'s "
                            f"password_file and acl_file ({len(users)} users, 3 roles)",
                   counts=counts, figure=f"{same}/{total} identical")


# --- a real cluster ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class SecuredCounts:
    blocked: dict[str, bool]  # attack -> it got nothing through
    generations: int  # a client's requests over TLS meanwhile
    identical: int  # of those, token-identical to run-local

    @property
    def ok(self) -> bool:
        return all(self.blocked.values()) and self.identical == self.generations

    def observed(self) -> str:
        failed = [a for a, ok in self.blocked.items() if not ok]
        return (f"{len(self.blocked) - len(failed)}/{len(self.blocked)} attacks got nothing through"
                + (f" (FAILED: {', '.join(failed)})" if failed else "")
                + f"; client alice over TLS: {self.identical}/{self.generations} generations token-identical "
                  "to run-local")


def secured_cluster(ctx: ChaosContext) -> Outcome[SecuredCounts]:
    from linguamq.tools.local import generate_local, open_local
    root = Path(tempfile.mkdtemp(prefix="secure-", dir=ctx.workdir))
    save_users(root / "users", make_users().values())
    certs = root / "certs"
    write_certificates(certs, [])
    ca = str(certs / "ca.crt")
    nodes = [NodeSpec(n, password=PASSWORDS[n], args=("--cafile", ca)) for n in ("n1", "n2")]
    hub_args = ("--users", str(root / "users"), "--tls-cert", str(certs / "server.crt"), "--tls-key",
                str(certs / "server.key"), "--tls-port", "0", "--tls-only")
    prompts = ["Hello world", "The quick brown fox", "Phones on a home Wi-Fi", "a"][:4 if ctx.full else 2]
    local = open_local(ctx.artifacts)
    attacks: dict[str, bool] = {}  # attack -> refused / got nothing
    with LocalCluster(artifacts=ctx.artifacts, nodes=nodes, workdir=root, cluster="secure", objective="even",
                      hub_args=hub_args) as cluster:
        login = login_to(cluster.url, cafile=ca)
        with contextlib.closing(_Closing(login("admin", "admin"))) as admin_box:
            admin = admin_box.client
            cluster.wait_ready(admin, nodes=2, timeout=120)
            attacks["anonymous"] = _refused(lambda: login(None, "stranger"))
            attacks["wrong password"] = _refused(lambda: login("alice", "guess", password="123456"))
            attacks["plaintext on the TLS-only port"] = _plaintext_refused(cluster.url)
            attacks["no --cafile"] = _refused(lambda: login_to(cluster.url)("alice", "no-ca"))
            reports: queue.Queue[ErrorReport] = queue.Queue()
            admin.subscribe(T.ERRORS, T.ERRORS.filter("secure"), lambda _t, r, _r: reports.put(r), wait=WAIT)
            with contextlib.closing(_Closing(login("bob", "bob-snoops"))) as bob_box, \
                    contextlib.closing(_Closing(login("n2", "evil-n2"))) as evil_box:
                bob_inbox: queue.Queue[paho.MQTTMessage] = queue.Queue()
                evil_inbox: queue.Queue[paho.MQTTMessage] = queue.Queue()
                bob_marker = T.ERRORS.build("secure", client="bob")
                evil_marker = T.NODE_CONTROL.build("secure", node="n2")
                for f in (f"{T.ROOT}/#", bob_marker):
                    bob_box.client.subscribe_raw(f, bob_inbox.put, qos=1, wait=WAIT)
                for f in (T.NODE_ASSIGN.filter("secure", node="n1"), T.PLAN.build("secure"), evil_marker):
                    evil_box.client.subscribe_raw(f, evil_inbox.put, qos=1, wait=WAIT)
                evil_box.client.publish_raw(T.NODE_STATUS.build("secure", node="n1"), b'{"forged": 1}', qos=1,
                                            wait=WAIT)
                with contextlib.closing(_Closing(login("alice", "alice-injects"))) as alice_box:
                    for piece in range(3):
                        alice_box.client.publish_raw(T.ACT.build("secure", piece=piece), b"LMQ1 garbage", qos=1,
                                                     wait=WAIT)
                results = _generate_all(login, prompts)
                admin.publish_raw(bob_marker, b"x-done", qos=1, wait=WAIT)
                admin.publish_raw(evil_marker, b"x-done", qos=1, wait=WAIT)
                bob_got = _until(bob_inbox, bob_marker)
                evil_got = _until(evil_inbox, evil_marker)
            attacks["node n2 reads n1's assignment and the plan"] = evil_got == []
            attacks["client bob reads lmq/# (alice's tokens, retained state)"] = bob_got == []
            time.sleep(0.3)
            injected_seen = [r for r in _drain(reports) if "/act/" in r.topic]
            attacks["client injects activations"] = injected_seen == []
            status = _retained_status(admin, "n1")
            attacks["node n2 forges n1's status"] = status is not None and b"forged" not in status
    identical = 0
    ms_per_token = []
    for prompt, result in zip(prompts, results, strict=True):
        ids = local.tokenizer.encode(prompt).ids
        ref = generate_local(local.runtime, prompt_ids=ids, max_tokens=16,
                             eos_token_ids=local.manifest.eos_token_ids).tokens
        identical += result is not None and result.error is None and result.tokens == ref
        if result is not None and result.ms_per_token:
            ms_per_token.append(result.ms_per_token)
    return Outcome(case="secured cluster",
                   injected=f"hub --users --tls-only, 2 nodes as their users; {len(attacks)} attacks: "
                            + ", ".join(attacks),
                   counts=SecuredCounts(blocked=attacks, generations=len(prompts), identical=identical),
                   figure=(f"{statistics.median(ms_per_token):.1f} ms/token over TLS with ACLs" if ms_per_token
                           else "no generation"))


def _plaintext_refused(url: str) -> bool:
    try:
        MqttClient(url=url.replace("mqtts://", "mqtt://"), client_id="plain", username="alice",
                   password=PASSWORDS["alice"]).start(2).stop()
    except MqttTimeout:
        return True
    except MqttError:
        return True
    return False


def _generate_all(login: Login, prompts: list[str]) -> list:
    results: list = [None] * len(prompts)

    def one(i: int) -> None:
        client = login("alice", f"alice-{i}")
        try:
            request = GenerateRequest(id=new_request_id(), prompt=prompts[i], max_tokens=16)
            results[i] = generate_remote(client, "secure", request, timeout=90)
        finally:
            client.stop()

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return results


def _retained_status(admin: MqttClient, node: str) -> bytes | None:
    box: queue.Queue[bytes] = queue.Queue()
    name = T.NODE_STATUS.build("secure", node=node)
    admin.subscribe_raw(name, lambda m: box.put(bytes(m.payload)), qos=1, wait=WAIT)
    try:
        return box.get(timeout=WAIT)
    except queue.Empty:
        return None
    finally:
        admin.unsubscribe(name)


def _drain(q: queue.Queue) -> list:
    out = []
    while not q.empty():
        out.append(q.get_nowait())
    return out


CASES = [Case("embedded ACL", embedded_acl), Case("mosquitto parity", mosquitto_parity),
         Case("secured cluster", secured_cluster)]
