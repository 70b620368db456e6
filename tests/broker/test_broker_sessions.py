"""MQTT 3.1.1's session promises, on the embedded broker and on mosquitto 2.0 alike.

A client that connects with clean session = false keeps its subscriptions and gets the QoS 1
and 2 messages published while it was away, in order, when it comes back ("session present"
set); what it had not acknowledged is sent again with DUP set [MQTT-4.4.0-1]; QoS 2 arrives
exactly once in both directions; a PUBLISH to a ``$`` topic is answered and never matched by a
filter that starts with a wildcard [MQTT-4.7.2-1]; a client's offline queue is bounded
(``max_queued_messages``) and what it drops is reported.

A RawClient (conftest) plays the client whose acknowledgements matter: it acknowledges only
when told to and can drop its connection without DISCONNECT. Where a case cannot run on
mosquitto the test says why.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import structlog

from linguamq.broker.process import BrokerOptions, BrokerProcess

pytestmark = pytest.mark.integration

END = "s/end"  # published last: everything the broker had for a client arrives before it


def receive_until(client, raw_mqtt, topic: str = END) -> list:
    """The PUBLISHes ``client`` gets before one on ``topic``, each acknowledged as its QoS
    asks (PUBACK; PUBREC, then PUBCOMP for the PUBREL)."""
    got, releasing, done = [], set(), False
    while not done or releasing:
        packet = client.read()
        assert packet is not None, "the broker closed the connection"
        if packet.kind == raw_mqtt.PUBREL:
            releasing.discard(packet.packet_id)
            client.ack(raw_mqtt.PUBCOMP, packet.packet_id)
            continue
        assert packet.kind == raw_mqtt.PUBLISH, packet
        message = raw_mqtt.parse(packet)
        if message.qos == 1:
            client.ack(raw_mqtt.PUBACK, message.packet_id)
        elif message.qos == 2:
            client.ack(raw_mqtt.PUBREC, message.packet_id)
            releasing.add(message.packet_id)
        if message.topic == topic:
            done = True
        else:
            got.append(message)
    return got


def away(raw_mqtt, port: int, client_id: str = "sub", *filters: tuple[str, int]):
    """A client with a persistent session subscribed to ``filters`` (s/# at QoS 2), now
    disconnected: the broker has closed its connection, so what follows is queued."""
    client = raw_mqtt.Client(port, client_id, clean=False)
    assert client.connect() is False
    client.subscribe(*(filters or [("s/#", 2)]))
    client.disconnect()
    return client


def test_session_present_flag(any_broker, raw_mqtt) -> None:
    client = raw_mqtt.Client(any_broker.port, "c", clean=False)
    assert client.connect() is False  # a new session
    client.disconnect()
    assert client.connect() is True  # resumed
    client.drop()
    assert client.connect() is True  # a lost connection keeps it too
    client.disconnect()
    assert client.connect(clean=True) is False  # a clean session ends it [MQTT-3.2.2-1] ...
    client.disconnect()
    assert client.connect() is False  # ... for good


def test_offline_qos1_and_qos2_are_queued_and_delivered_in_order(any_broker, any_peer, raw_mqtt) -> None:
    sub = away(raw_mqtt, any_broker.port)
    pub = any_peer("pub")
    sent = [("s/1", b"a", 1), ("s/2", b"b", 2), ("s/3", b"c", 0), ("s/4", b"d", 1), ("s/5", b"e", 2)]
    for topic, payload, qos in sent:
        pub.publish(topic, payload, qos=qos)
    assert sub.connect() is True
    pub.publish("s/6", b"f", qos=1)  # live, after the queue
    pub.publish(END, b"", qos=1)
    got = receive_until(sub, raw_mqtt)
    # QoS 0 may be queued or not (neither broker does); QoS 1 and 2 must be, in order.
    assert [(m.topic, m.payload, m.qos) for m in got if m.qos] == [
        ("s/1", b"a", 1), ("s/2", b"b", 2), ("s/4", b"d", 1), ("s/5", b"e", 2), ("s/6", b"f", 1)]
    assert not any(m.dup or m.retain for m in got)


def test_clean_session_discards_subscriptions_and_queue(any_broker, any_peer, raw_mqtt) -> None:
    sub = away(raw_mqtt, any_broker.port)
    pub = any_peer("pub")
    pub.publish("s/1", b"a", qos=1)
    assert sub.connect(clean=True) is False
    sub.subscribe((END, 1))
    pub.publish("s/2", b"b", qos=1)  # only the old s/# would match it
    pub.publish(END, b"", qos=1)
    assert receive_until(sub, raw_mqtt) == []


def test_unacknowledged_qos1_is_sent_again_with_dup(any_broker, any_peer, raw_mqtt) -> None:
    sub = raw_mqtt.Client(any_broker.port, "sub", clean=False)
    sub.connect()
    sub.subscribe(("s/#", 1))
    pub = any_peer("pub")
    pub.publish("s/x", b"x", qos=1)
    first = sub.receive()
    assert (first.topic, first.qos, first.dup) == ("s/x", 1, False)
    sub.drop()  # no PUBACK
    assert sub.connect() is True
    again = sub.receive()
    assert again == ("s/x", b"x", 1, first.packet_id, True, False)
    sub.ack(raw_mqtt.PUBACK, again.packet_id)
    sub.disconnect()
    assert sub.connect() is True
    pub.publish(END, b"", qos=1)
    assert receive_until(sub, raw_mqtt) == []  # acknowledged: not sent a third time


def test_unacknowledged_qos2_resumes_where_it_stopped(any_broker, any_peer, raw_mqtt) -> None:
    sub = raw_mqtt.Client(any_broker.port, "sub", clean=False)
    sub.connect()
    sub.subscribe(("s/#", 2))
    pub = any_peer("pub")
    pub.publish("s/y", b"y", qos=2)
    first = sub.receive()
    assert (first.topic, first.qos, first.dup) == ("s/y", 2, False)
    sub.drop()  # no PUBREC: the PUBLISH is sent again, DUP set
    assert sub.connect() is True
    again = sub.receive()
    assert again == ("s/y", b"y", 2, first.packet_id, True, False)
    sub.ack(raw_mqtt.PUBREC, again.packet_id)
    assert sub.expect(raw_mqtt.PUBREL).packet_id == again.packet_id
    sub.drop()  # no PUBCOMP: the PUBREL is sent again, not the PUBLISH
    assert sub.connect() is True
    assert sub.expect(raw_mqtt.PUBREL).packet_id == again.packet_id
    sub.ack(raw_mqtt.PUBCOMP, again.packet_id)
    pub.publish(END, b"", qos=1)
    assert receive_until(sub, raw_mqtt) == []


def test_qos2_from_a_client_is_delivered_exactly_once(any_broker, any_peer, raw_mqtt) -> None:
    watcher = any_peer("watcher")
    watcher.subscribe(("s/#", 2))
    pub = raw_mqtt.Client(any_broker.port, "pub", clean=False)
    pub.connect()
    pid = pub.publish("s/once", b"once", qos=2)
    assert pub.expect(raw_mqtt.PUBREC).packet_id == pid
    pub.publish("s/once", b"once", qos=2, packet_id=pid, dup=True)  # as if the PUBREC was lost
    assert pub.expect(raw_mqtt.PUBREC).packet_id == pid
    pub.drop()
    assert pub.connect() is True
    pub.ack(raw_mqtt.PUBREL, pid)  # resumed: the PUBREL completes it
    assert pub.expect(raw_mqtt.PUBCOMP).packet_id == pid
    pub.ack(raw_mqtt.PUBREL, pid)  # a repeated PUBREL is answered and delivers nothing more
    assert pub.expect(raw_mqtt.PUBCOMP).packet_id == pid
    assert watcher.sync() == [("s/once", b"once", 2, False)]


def test_qos2_both_ways_with_paho(any_peer) -> None:
    pub, sub = any_peer("pub"), any_peer("sub")
    sub.subscribe(("s/#", 2))
    for i in range(20):
        pub.publish(f"s/{i % 3}", b"%d" % i, qos=2)
    assert sub.sync() == [(f"s/{i % 3}", b"%d" % i, 2, False) for i in range(20)]


def test_a_burst_beyond_the_in_flight_window_arrives_whole_and_in_order(any_broker, any_peer, raw_mqtt) -> None:
    # 200 QoS 1 messages at once to one subscriber: 20 in flight, the rest wait their turn.
    sub = any_peer("sub")
    sub.subscribe(("s/#", 1))
    pub = raw_mqtt.Client(any_broker.port, "pub")
    pub.connect()
    for i in range(200):
        pub.publish(f"s/{i % 3}", b"%d" % i, qos=1)
    assert sorted(pub.expect(raw_mqtt.PUBACK).packet_id for _ in range(200)) == list(range(1, 201))
    assert sub.sync() == [(f"s/{i % 3}", b"%d" % i, 1, False) for i in range(200)]


def test_delivery_qos_is_the_lower_of_publish_and_subscription(any_peer) -> None:
    # [MQTT-3.8.4-6]: a QoS 0 message does not become QoS 1 on its way to a QoS 1 subscriber.
    pub, sub = any_peer("pub"), any_peer("sub")
    sub.subscribe(("s/#", 1))
    for qos in (0, 1, 2):
        pub.publish(f"s/{qos}", b"x", qos=qos)
    assert [(m.topic, m.qos) for m in sub.sync()] == [("s/0", 0), ("s/1", 1), ("s/2", 1)]


def test_a_new_connection_takes_over_a_persistent_session(any_broker, any_peer, raw_mqtt) -> None:
    old = raw_mqtt.Client(any_broker.port, "sub", clean=False)
    old.connect()
    old.subscribe(("s/#", 1))
    new = raw_mqtt.Client(any_broker.port, "sub", clean=False)
    assert new.connect() is True  # while the old connection is still open (a half-open phone)
    assert old.read() is None  # the broker closed the old one
    pub = any_peer("pub")
    pub.publish("s/1", b"a", qos=1)
    pub.publish(END, b"", qos=1)
    assert [(m.topic, m.payload) for m in receive_until(new, raw_mqtt)] == [("s/1", b"a")]


def test_a_takeover_resends_what_the_old_connection_left_unacknowledged(any_broker, any_peer, raw_mqtt) -> None:
    old = raw_mqtt.Client(any_broker.port, "sub", clean=False)
    old.connect()
    old.subscribe(("s/#", 1))
    pub = any_peer("pub")
    for topic in ("s/1", "s/2"):
        pub.publish(topic, topic.encode(), qos=1)
    first = [old.receive(), old.receive()]  # not acknowledged
    new = raw_mqtt.Client(any_broker.port, "sub", clean=False)
    assert new.connect() is True
    assert old.read() is None
    again = [new.receive(), new.receive()]
    assert again == [m._replace(dup=True) for m in first]
    for message in again:
        new.ack(raw_mqtt.PUBACK, message.packet_id)
    pub.publish(END, b"", qos=1)
    assert receive_until(new, raw_mqtt) == []


@pytest.mark.parametrize("qos", [1, 2])
def test_publish_to_a_dollar_topic_is_answered(any_broker, any_peer, raw_mqtt, qos: int) -> None:
    # Both brokers acknowledge it and keep the connection; "$SYS/..." is the brokers' own and
    # dropped, another "$" topic is delivered, but never to a filter starting with # or +.
    watcher, system = any_peer("watcher"), any_peer("system")
    watcher.subscribe(("#", 2), ("+/linguamq/x", 2), ("$linguamq/x", 2))
    system.subscribe(("$SYS/linguamq/#", 2))
    rogue = raw_mqtt.Client(any_broker.port, "rogue")
    rogue.connect()
    for topic in ("$SYS/linguamq/x", "$linguamq/x"):
        pid = rogue.publish(topic, b"x", qos=qos)
        if qos == 1:
            assert rogue.expect(raw_mqtt.PUBACK).packet_id == pid
        else:
            assert rogue.expect(raw_mqtt.PUBREC).packet_id == pid
            rogue.ack(raw_mqtt.PUBREL, pid)
            assert rogue.expect(raw_mqtt.PUBCOMP).packet_id == pid
    assert watcher.sync() == [("$linguamq/x", b"x", qos, False)]  # once: from "$linguamq/x" only
    assert system.sync() == []


def test_offline_queue_is_bounded_and_drops_are_reported(broker_with, raw_mqtt) -> None:
    broker = broker_with(max_queued_messages=3)
    sub = away(raw_mqtt, broker.port)
    pub = raw_mqtt.Client(broker.port, "pub")
    pub.connect()
    for i in range(5):
        pid = pub.publish(f"s/{i}", b"%d" % i, qos=1)
        assert pub.expect(raw_mqtt.PUBACK).packet_id == pid
    assert sub.connect() is True
    assert pub.publish(END, b"", qos=1) == pub.expect(raw_mqtt.PUBACK).packet_id
    assert [m.payload for m in receive_until(sub, raw_mqtt)] == [b"0", b"1", b"2"]  # the newest dropped
    if broker.kind == "embedded":
        assert broker.thread.broker.stats().queue_dropped == 2
    else:
        assert "Outgoing messages are being dropped for client sub" in broker.log.read_text()


def test_a_client_that_does_not_acknowledge_is_bounded_too(broker_with, raw_mqtt) -> None:
    # One message in flight, two more wait behind it, the rest are dropped: what a connected
    # client that stops acknowledging costs the broker is bounded as for one that is away.
    broker = broker_with(max_inflight_messages=1, max_queued_messages=2)
    sub = raw_mqtt.Client(broker.port, "sub")
    sub.connect()
    sub.subscribe(("s/#", 1))
    pub = raw_mqtt.Client(broker.port, "pub")
    pub.connect()
    for i in range(5):
        pid = pub.publish(f"s/{i}", b"%d" % i, qos=1)
        assert pub.expect(raw_mqtt.PUBACK).packet_id == pid
    received = []
    for _ in range(3):  # each acknowledgement lets the next one go
        message = sub.receive()
        received.append(message.payload)
        sub.ack(raw_mqtt.PUBACK, message.packet_id)
    assert pub.publish(END, b"", qos=1) == pub.expect(raw_mqtt.PUBACK).packet_id
    assert received + [m.payload for m in receive_until(sub, raw_mqtt)] == [b"0", b"1", b"2"]
    if broker.kind == "embedded":
        assert broker.thread.broker.stats().queue_dropped == 2
    else:
        assert "Outgoing messages are being dropped for client sub" in broker.log.read_text()


# --- the embedded broker only ---------------------------------------------------------------


def wait_for(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_session_of_a_client_that_never_returns_expires(custom_broker, raw_mqtt) -> None:
    # Embedded only: mosquitto's persistent_client_expiration counts in hours at least.
    running, peer = custom_broker(session_expiry_s=0.5)
    sub = away(raw_mqtt, running.port)
    peer("pub").publish("s/1", b"a", qos=1)
    assert wait_for(lambda: running.broker.stats().sessions_expired == 1)
    assert running.broker.stats().queue_dropped == 1  # the queued message went with it
    assert sub.connect() is False
    sub.disconnect()


def test_queued_messages_obey_the_read_policy(custom_broker, raw_mqtt) -> None:
    # Embedded only: mosquitto checks read access when a filter is subscribed (SUBACK 0x80),
    # so a subscription that matches topics its client may not read cannot exist there.
    denied = {"s/secret"}
    running, peer = custom_broker(may_read=lambda client, topic: not (client.client_id == "sub"
                                                                      and topic in denied))
    sub = away(raw_mqtt, running.port)
    pub = peer("pub")
    for topic in ("s/secret", "s/ok", "s/later"):
        pub.publish(topic, b"x", qos=1)
    denied.add("s/later")  # refused while it was queued: asked again at delivery
    assert sub.connect() is True
    pub.publish(END, b"", qos=1)
    assert [m.topic for m in receive_until(sub, raw_mqtt)] == ["s/ok"]
    # One sent but not acknowledged is asked again too before it goes with DUP set.
    pub.publish("s/revoked", b"x", qos=1)
    assert sub.receive().topic == "s/revoked"
    sub.drop()  # no PUBACK
    denied.add("s/revoked")
    assert sub.connect() is True
    pub.publish(END, b"", qos=1)
    assert receive_until(sub, raw_mqtt) == []


def test_each_burst_of_drops_to_a_connected_client_is_logged(custom_broker, raw_mqtt) -> None:
    # Embedded only (its log): a node stays connected for days, so an overflow after its queue
    # drained is logged again -- not only the first one since it connected.
    with structlog.testing.capture_logs() as logs:
        running, _ = custom_broker(max_inflight_messages=1, max_queued_messages=1)
        sub = raw_mqtt.Client(running.port, "sub")
        sub.connect()
        sub.subscribe(("s/#", 1))
        pub = raw_mqtt.Client(running.port, "pub")
        pub.connect()
        for _ in range(2):
            for i in range(3):  # one in flight, one waits behind it, one dropped
                pid = pub.publish(f"s/{i}", b"%d" % i, qos=1)
                assert pub.expect(raw_mqtt.PUBACK).packet_id == pid
            for _ in range(2):  # the queue drains: the burst is over
                message = sub.receive()
                sub.ack(raw_mqtt.PUBACK, message.packet_id)
        pub.publish(END, b"", qos=1)
        assert receive_until(sub, raw_mqtt) == []
    assert len([e for e in logs if e["event"] == "broker.messages_dropped"]) == 2
    assert [e["dropped"] for e in logs if e["event"] == "broker.queue_dropped"] == [1, 1]
    assert running.broker.stats().queue_dropped == 2


def test_qos0_to_a_client_that_does_not_read_is_bounded(custom_broker, raw_mqtt) -> None:
    # Embedded only (its stats). A QoS 0 message waits on no in-flight window: without a
    # bound, each one sent to a client that stops reading its socket would hold its payload
    # in the broker until keep-alive closes the connection.
    mib = 2**20
    running, _ = custom_broker(max_queued_bytes=4 * mib)
    stuck = raw_mqtt.Client(running.port, "stuck")
    stuck.connect()
    stuck.subscribe(("s/#", 0), (END, 1))  # and never reads again
    pub = raw_mqtt.Client(running.port, "pub")
    pub.connect()
    for i in range(64):
        pub.publish(f"s/{i}", bytes(mib), qos=0)
    assert pub.publish("x/sync", b"", qos=1) == pub.expect(raw_mqtt.PUBACK).packet_id  # all 64 routed
    stats = running.broker.stats()
    assert stats.queue_dropped > 0
    assert stats.sending <= 5  # 4 MiB of them, and one that goes whatever its size
    # Once it reads again it gets what was kept, in order, and then new messages.
    pub.publish(END, b"", qos=1)  # QoS 1 on its way to "stuck": not dropped with the QoS 0 ones
    got = receive_until(stuck, raw_mqtt)
    indexes = [int(m.topic.split("/")[1]) for m in got]
    assert indexes == sorted(indexes) and len(got) + stats.queue_dropped == 64


def test_a_client_holding_too_many_unreleased_qos2_is_disconnected(custom_broker, raw_mqtt) -> None:
    # Each QoS 2 PUBLISH is kept until its PUBREL: a client that never sends one must not make
    # the broker keep payloads without bound. The one beyond max_inflight_messages closes the
    # connection, as in mosquitto's own test pub-qos2-inflight-exceeded (embedded only: the
    # mosquitto 2.0.11 here answers every one with PUBREC and silently loses those beyond
    # its limits).
    running, _ = custom_broker(max_inflight_messages=2)
    pub = raw_mqtt.Client(running.port, "pub", clean=False)
    pub.connect()
    for pid in (1, 2):
        assert pub.publish("s/x", b"x", qos=2, packet_id=pid) == pub.expect(raw_mqtt.PUBREC).packet_id
    pub.ack(raw_mqtt.PUBREL, 1)  # released: room for one more
    assert pub.expect(raw_mqtt.PUBCOMP).packet_id == 1
    pub.publish("s/x", b"x", qos=2, packet_id=2, dup=True)  # the same one again takes no room
    assert pub.expect(raw_mqtt.PUBREC).packet_id == 2
    assert pub.publish("s/x", b"x", qos=2, packet_id=3) == pub.expect(raw_mqtt.PUBREC).packet_id
    pub.publish("s/x", b"x", qos=2, packet_id=4)
    assert pub.read() is None  # closed


def test_a_takeover_outlived_by_its_old_connection_sends_no_will(custom_broker, raw_mqtt) -> None:
    # Embedded only: the old connection's end is stalled from inside the broker. A takeover
    # waits connect_timeout / 2 for the old connection to close; one that ends later must
    # not say "offline" for a node that is online on its new connection, nor mark the
    # session away (a third connection would then not close the second).
    running, watcher_of = custom_broker(connect_timeout=0.5)
    broker = running.broker._amqtt
    release, stalled_done = threading.Event(), threading.Event()
    original = broker._handle_disconnect

    async def stalled(session, handler, waiter) -> None:
        if stalled_done.is_set() or release.is_set():
            return await original(session, handler, waiter)
        await asyncio.to_thread(release.wait, raw_mqtt.wait)
        try:
            await original(session, handler, waiter)
        finally:
            stalled_done.set()

    broker._handle_disconnect = stalled
    watcher = watcher_of("watcher")
    watcher.subscribe(("status/#", 1))
    will = ("status/node", b"offline", 1, False)
    old = raw_mqtt.Client(running.port, "node", clean=False, will=will)
    old.connect()
    new = raw_mqtt.Client(running.port, "node", clean=False, will=will)
    assert new.connect() is True  # the old one is still being closed
    assert new.publish("status/node", b"online", qos=1) == new.expect(raw_mqtt.PUBACK).packet_id
    release.set()
    assert stalled_done.wait(raw_mqtt.wait)
    assert watcher.sync() == [("status/node", b"online", 1, False)]
    third = raw_mqtt.Client(running.port, "node", clean=False)
    assert third.connect() is True
    assert new.read() is None  # taken over: closed


def test_qos0_behind_a_full_in_flight_window_keeps_its_place(custom_broker, raw_mqtt) -> None:
    # One QoS 1 in flight; what follows waits behind it, QoS 0 included, in publish order.
    # Embedded only: mosquitto 2.0.11 sends a QoS 0 at once, ahead of the QoS 1 waiting.
    running, _ = custom_broker(max_inflight_messages=1)
    sub = raw_mqtt.Client(running.port, "sub")
    sub.connect()
    sub.subscribe(("s/#", 1))
    pub = raw_mqtt.Client(running.port, "pub")
    pub.connect()
    sent = [("s/0", 1), ("s/1", 1), ("s/2", 0), ("s/3", 1), ("s/4", 0), (END, 1)]
    for topic, qos in sent:
        pid = pub.publish(topic, b"", qos=qos)
        if qos:
            assert pub.expect(raw_mqtt.PUBACK).packet_id == pid
    assert [(m.topic, m.qos) for m in receive_until(sub, raw_mqtt)] == sent[:-1]


def test_a_qos0_burst_to_a_client_that_reads_is_not_dropped(custom_broker, raw_mqtt) -> None:
    # The bound above is for a client that does not read: one that does gets a burst of
    # QoS 0 whole, even when the broker starts more sends at once than max_queued_messages.
    running, _ = custom_broker(max_queued_messages=10)
    sub = raw_mqtt.Client(running.port, "sub")
    sub.connect()
    sub.subscribe(("s/#", 0), (END, 1))
    pub = raw_mqtt.Client(running.port, "pub")
    pub.connect()
    for i in range(1000):
        pub.publish("s/x", b"%d" % i, qos=0)
    pub.publish(END, b"", qos=1)
    assert [m.payload for m in receive_until(sub, raw_mqtt)] == [b"%d" % i for i in range(1000)]
    assert running.broker.stats().queue_dropped == 0


def test_the_broker_process_takes_the_limits(raw_mqtt) -> None:
    # What `linguamq hub --max-queued-messages 2` starts: the broker in its own process.
    options = BrokerOptions(max_inflight_messages=5, max_queued_messages=2, max_queued_bytes=2**20,
                            session_expiry_s=60)
    with BrokerProcess(options=options) as running:
        port = int(running.url.rsplit(":", 1)[1])
        sub = away(raw_mqtt, port)
        pub = raw_mqtt.Client(port, "pub")
        pub.connect()
        for i in range(4):
            pid = pub.publish(f"s/{i}", b"%d" % i, qos=1)
            assert pub.expect(raw_mqtt.PUBACK).packet_id == pid
        assert sub.connect() is True
        assert pub.publish(END, b"", qos=1) == pub.expect(raw_mqtt.PUBACK).packet_id
        assert [m.payload for m in receive_until(sub, raw_mqtt)] == [b"0", b"1"]
