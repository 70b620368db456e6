"""Live delivery on the embedded broker (which handles a PUBLISH, SUBSCRIBE or UNSUBSCRIBE in
the task that read it, amqtt_fixes 12 and 14) and on mosquitto: a client's packets take effect
in the order it sent them; a PUBLISH to an invalid topic reaches no one."""

from __future__ import annotations

import pytest

from linguamq import topics as T

pytestmark = pytest.mark.integration

CLUSTER = "home"


def test_one_publishers_messages_arrive_in_order(any_peer) -> None:
    # QoS 0 and 1 mixed, some retained, on two topics, sent without waiting in between
    # (fewer QoS 1 messages than paho's and mosquitto's in-flight windows of 20).
    head, watcher = any_peer("head"), any_peer("watcher")
    watcher.subscribe((T.cluster_filter(CLUSTER), 1))
    sent = []
    for i in range(30):
        topic = T.ACT.build(CLUSTER, piece=i % 2)
        payload = f"m{i:02d}".encode()
        info = head.client.publish(topic, payload, qos=1 if i % 3 == 0 else 0, retain=i % 7 == 0)
        sent.append((info, topic, payload))
    for info, _, _ in sent:
        info.wait_for_publish(timeout=5)
    got = watcher.sync()
    assert [(m.topic, m.payload) for m in got] == [(topic, payload) for _, topic, payload in sent]


# A PUBLISH to an empty topic is a protocol error [MQTT-4.7.3-1]: both brokers close the
# connection. A client's PUBLISH to a "$SYS" topic is never delivered: both brokers drop it
# and keep the client (amqtt closed the connection, broker.py:772-776; amqtt_fixes 22), and
# deliver other "$" topics (test_broker_sessions.py).
# (A PUBLISH to a wildcard topic is not covered here: mosquitto closes
# the connection, amqtt drops the packet while parsing it, handler.py:532-533, and leaves its
# payload unread in the stream.)
@pytest.mark.parametrize(("topic", "closes"), [
    ("", {"embedded": True, "mosquitto": True}),
    ("$SYS/linguamq/x", {"embedded": False, "mosquitto": False}),
], ids=["empty", "sys"])
def test_publishing_to_an_invalid_topic(any_broker, any_peer, raw_mqtt, topic: str,
                                        closes: dict[str, bool]) -> None:
    watcher = any_peer("watcher")
    watcher.subscribe("#", "$SYS/linguamq/#")
    sock = raw_mqtt.connect(any_broker.port, "rogue", keepalive=60)
    try:
        sock.sendall(publish_packet(topic, b"x"))
        expected = closes[any_broker.kind]
        assert raw_mqtt.closed_by_peer(sock, timeout=raw_mqtt.wait if expected else 0.5) is expected
    finally:
        sock.close()
    assert watcher.sync() == []


def publish_packet(topic: str, payload: bytes) -> bytes:
    """A QoS 0 PUBLISH, written by hand: paho refuses to send one to such a topic."""
    name = topic.encode()
    body = len(name).to_bytes(2, "big") + name + payload
    assert len(body) < 128  # a one-byte remaining length
    return bytes([0x30, len(body)]) + body


def test_unsubscribe_then_subscribe_at_once_leaves_the_subscription(any_peer) -> None:
    # A client's packets take effect in the order sent: an UNSUBSCRIBE and a SUBSCRIBE of the
    # same filter, sent back to back, leave it subscribed (amqtt_fixes 14).
    sender, n1 = any_peer("sender"), any_peer("n1")
    topic = T.ACT.build(CLUSTER, piece=0)
    n1.subscribe(topic)
    for _ in range(5):
        n1.client.unsubscribe(topic)
        n1.subscribe(topic)
        sender.publish(topic, b"x", qos=0)
        assert n1.sync() == [(topic, b"x", 0, False)]
