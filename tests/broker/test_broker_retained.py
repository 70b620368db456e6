"""Retained messages reach exactly the clients whose filters match them, each once.

What "once" means (MQTT 3.1.1): a SUBSCRIBE sends every retained message that its filters
match, capped by the QoS it was published with. A later SUBSCRIBE whose filter matches the
same retained message sends it again -- [MQTT-3.3.1-6] requires it for every new
subscription, [MQTT-3.8.4-3] for a re-subscription -- so consumers of retained topics must be
idempotent (assignments carry their epoch). Nothing retained is sent on CONNECT, and nothing
to a client whose filters do not match.

The tests on ``any_peer`` run on the embedded broker and on mosquitto 2.0 alike. Where the
two differ (one SUBSCRIBE whose filters overlap), each broker's behaviour is asserted and the
difference written down.
"""

from __future__ import annotations

import pytest

from linguamq import topics as T
from linguamq.broker import BrokerConfigError, ClientInfo, EmbeddedBroker

pytestmark = pytest.mark.integration

CLUSTER = "home"
NODES = ("n1", "n2", "n3")


def assign(node: str) -> str:
    return T.NODE_ASSIGN.build(CLUSTER, node=node)


def seed_cluster(peer):  # peer: a Peer factory (any_peer)
    """A planner that published retained assignments and a plan, and the clients a live
    cluster has: a monitor on everything and node n2 on its own and everyone's assignments.
    Their filters matter: amqtt 0.12.1 replayed retained messages for all of them to every
    newcomer."""
    planner = peer("planner")
    for node in NODES:
        planner.publish(assign(node), f"assign-{node}".encode(), qos=1, retain=True)
    planner.publish(T.PLAN.build(CLUSTER), b"plan-1", qos=1, retain=True)
    peer("monitor").subscribe(T.cluster_filter(CLUSTER))
    n2 = peer("n2")
    n2.subscribe(assign("n2"))
    n2.subscribe(T.NODE_ASSIGN.filter(CLUSTER))
    return planner


def topics_of(messages: list) -> list[str]:  # list of conftest.Msg
    return sorted(m.topic for m in messages)


def test_nothing_retained_arrives_on_connect(any_peer) -> None:
    seed_cluster(any_peer)
    n1 = any_peer("n1")
    assert n1.sync() == []


def test_node_gets_its_own_assignment_once_and_no_other(any_peer) -> None:
    seed_cluster(any_peer)
    n1 = any_peer("n1")
    assert n1.subscribe((assign("n1"), 1)) == [1]
    assert n1.sync() == [(assign("n1"), b"assign-n1", 1, True)]


@pytest.mark.parametrize(("make_filter", "expected"), [
    (lambda: assign("n3"), [assign("n3")]),
    (lambda: T.NODE_ASSIGN.filter(CLUSTER), sorted(assign(n) for n in NODES)),
    (lambda: T.cluster_filter(CLUSTER), sorted([*(assign(n) for n in NODES), T.PLAN.build(CLUSTER)])),
], ids=["exact", "plus", "hash"])
def test_each_filter_gets_exactly_its_retained_messages(any_peer, make_filter, expected) -> None:
    seed_cluster(any_peer)
    watcher = any_peer("watcher")
    watcher.subscribe(make_filter())
    got = watcher.sync()
    assert topics_of(got) == expected
    assert all(m.retain for m in got)


# One SUBSCRIBE with overlapping filters (n1's own assignment at QoS 1, every assignment and
# the whole cluster at QoS 0). [MQTT-3.3.5-1] requires a matching message at the highest QoS
# of the matching subscriptions and allows one further copy per additional matching filter.
# - embedded: each retained message once, at the highest QoS granted to a matching filter of
#   that SUBSCRIBE (amqtt_fixes 3).
# - mosquitto 2.0.11: once per matching filter, each at that filter's QoS -- n1's own
#   assignment three times. (Its live delivery, below, sends one copy.)
OVERLAPPING_RETAINED = {
    "embedded": [(assign("n1"), 1), (assign("n2"), 0), (assign("n3"), 0), (T.PLAN.build(CLUSTER), 0)],
    "mosquitto": [(assign("n1"), 0), (assign("n1"), 0), (assign("n1"), 1), (assign("n2"), 0),
                  (assign("n2"), 0), (assign("n3"), 0), (assign("n3"), 0), (T.PLAN.build(CLUSTER), 0)],
}


def test_overlapping_filters_in_one_subscribe(any_broker, any_peer) -> None:
    seed_cluster(any_peer)
    n1 = any_peer("n1")
    codes = n1.subscribe((assign("n1"), 1), T.NODE_ASSIGN.filter(CLUSTER), T.cluster_filter(CLUSTER))
    assert codes == [1, 0, 0]
    got = n1.sync()
    assert all(m.retain for m in got)
    assert sorted((m.topic, m.qos) for m in got) == OVERLAPPING_RETAINED[any_broker.kind]


def test_a_live_message_reaches_overlapping_subscriptions_once(any_peer) -> None:
    # Both brokers: once, at the highest QoS of the matching subscriptions (amqtt_fixes 13).
    planner, n1 = any_peer("planner"), any_peer("n1")
    n1.subscribe((assign("n1"), 1), T.NODE_ASSIGN.filter(CLUSTER), T.cluster_filter(CLUSTER))
    planner.publish(assign("n1"), b"live", qos=1)
    assert n1.sync() == [(assign("n1"), b"live", 1, False)]


def test_each_subscribe_packet_sends_its_matches_once(any_peer) -> None:
    seed_cluster(any_peer)
    n1 = any_peer("n1")
    n1.subscribe(T.NODE_ASSIGN.filter(CLUSTER))
    assert topics_of(n1.sync()) == sorted(assign(n) for n in NODES)
    n1.subscribe(assign("n1"))  # a new, overlapping subscription [MQTT-3.3.1-6]
    assert topics_of(n1.sync()) == [assign("n1")]
    n1.subscribe((assign("n1"), 1))  # re-subscription replaces it [MQTT-3.8.4-3]
    assert n1.sync() == [(assign("n1"), b"assign-n1", 1, True)]


def test_resubscribing_with_another_qos_replaces_the_subscription(any_peer) -> None:
    sender, n1 = any_peer("sender"), any_peer("n1")
    n1.subscribe((assign("n1"), 0))
    n1.subscribe((assign("n1"), 1))
    sender.publish(assign("n1"), b"live", qos=1)
    assert n1.receive() == (assign("n1"), b"live", 1, False)


def test_empty_retained_payload_clears_the_retained_message(any_peer) -> None:
    planner, live = any_peer("planner"), any_peer("live")
    live.subscribe(assign("n1"))
    planner.publish(assign("n1"), b"epoch-1", retain=True)
    planner.publish(assign("n1"), b"epoch-2", retain=True)
    planner.publish(assign("n2"), b"other", retain=True)
    late = any_peer("late")
    late.subscribe(assign("n1"))
    assert late.sync() == [(assign("n1"), b"epoch-2", 0, True)]  # replaced
    planner.publish(assign("n1"), b"", retain=True)
    # a subscriber already there gets the empty message like any other [MQTT-3.3.1-10] ...
    assert [m.payload for m in live.sync()] == [b"epoch-1", b"epoch-2", b""]
    # ... and later subscribers get nothing retained for that topic any more [MQTT-3.3.1-11]
    later = any_peer("later")
    later.subscribe(T.NODE_ASSIGN.filter(CLUSTER))
    assert later.sync() == [(assign("n2"), b"other", 0, True)]


def test_may_read_applies_to_retained_and_live_messages(custom_broker) -> None:
    def may_read(client: ClientInfo, topic: str) -> bool:
        parsed = T.parse(topic) if topic.startswith(T.ROOT + "/") else None
        return parsed is None or parsed.kind != "node_assign" or parsed["node"] == client.client_id

    _, peer = custom_broker(may_read=may_read)
    planner = peer("planner")
    for node in NODES:
        planner.publish(assign(node), node.encode(), retain=True)
    n1 = peer("n1")
    n1.subscribe(T.NODE_ASSIGN.filter(CLUSTER))
    assert topics_of(n1.sync()) == [assign("n1")]
    planner.publish(assign("n2"), b"live-n2")
    planner.publish(assign("n1"), b"live-n1")
    assert n1.sync() == [(assign("n1"), b"live-n1", 0, False)]


def test_a_failing_policy_denies(custom_broker) -> None:
    def broken(client: ClientInfo, topic: str) -> bool:
        if T.matches(T.NODE_ASSIGN.filter(), topic):
            raise RuntimeError("policy bug")
        return True  # lets Peer.sync()'s probe through

    _, peer = custom_broker(may_read=broken)
    planner, n1 = peer("planner"), peer("n1")
    planner.publish(assign("n1"), b"x", retain=True)
    n1.subscribe(assign("n1"))
    planner.publish(assign("n1"), b"y")
    assert n1.sync() == []


def test_embedded_broker_rejects_nonsense_settings() -> None:
    for bad in ({"port": -1}, {"port": 70_000}, {"max_payload": 1000}, {"host": ""},
                {"connect_timeout": 0}, {"max_inflight_messages": 0}, {"max_inflight_messages": 65_536},
                {"max_queued_messages": 0}, {"max_queued_bytes": -1}, {"session_expiry_s": 0}):
        with pytest.raises(BrokerConfigError):
            EmbeddedBroker(**bad)  # type: ignore[arg-type]
