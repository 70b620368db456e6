"""The embedded broker's lifecycle, addresses, payloads, keep-alive, takeover and policies."""

from __future__ import annotations

import asyncio
import socket

import pytest

from linguamq import topics as T
from linguamq.broker import BrokerNotRunningError, BrokerStartError, BrokerThread, ClientInfo, EmbeddedBroker

pytestmark = pytest.mark.integration

CLUSTER = "home"
KIB = 1024


def act(piece: int) -> str:
    return T.ACT.build(CLUSTER, piece=piece)


def status(node: str) -> str:
    return T.NODE_STATUS.build(CLUSTER, node=node)


def test_port_zero_reports_the_bound_port_and_url(broker) -> None:
    assert broker.host == "127.0.0.1"
    assert 0 < broker.port < 65_536
    assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
    socket.create_connection((broker.host, broker.port), timeout=5).close()


def test_async_lifecycle_and_errors() -> None:
    async def scenario() -> None:
        idle = EmbeddedBroker()
        with pytest.raises(BrokerNotRunningError):
            _ = idle.port
        async with EmbeddedBroker() as first:
            _, writer = await asyncio.wait_for(asyncio.open_connection(first.host, first.port), 5)
            writer.close()
            await writer.wait_closed()
            taken = EmbeddedBroker(port=first.port)
            with pytest.raises(BrokerStartError):
                await taken.start()
            port = first.port
        with pytest.raises(OSError):  # stopped: the port no longer listens
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        await first.stop()  # stopping twice is harmless
        async with first:  # and a stopped broker starts again
            assert first.port > 0

    asyncio.run(scenario())


def test_thread_reports_start_errors() -> None:
    with BrokerThread() as running:
        clash = BrokerThread(broker=EmbeddedBroker(port=running.port))
        with pytest.raises(BrokerStartError):
            clash.start()


def test_qos1_round_trip(peer) -> None:
    head, stage = peer("head"), peer("stage-1")
    assert stage.subscribe((act(0), 1)) == [1]
    head.publish(act(0), b"tokens", qos=1)  # returns once the broker's PUBACK is in
    assert stage.receive() == (act(0), b"tokens", 1, False)


def test_one_mib_payload_round_trip(peer) -> None:
    head, stage = peer("head"), peer("stage-1")
    stage.subscribe((act(3), 1))
    payload = bytes(range(256)) * (4 * KIB)  # 1 MiB
    head.publish(act(3), payload, qos=1)
    got = stage.receive()
    assert (got.topic, len(got.payload), got.payload == payload) == (act(3), len(payload), True)


def test_payload_over_the_limit_closes_the_senders_connection(custom_broker) -> None:
    _, peer = custom_broker(max_payload=64 * KIB)
    stage, head = peer("stage-1"), peer("head")
    stage.subscribe(act(1))
    head.publish(act(1), b"a" * 64 * KIB, qos=0)  # at the limit: fine
    assert len(stage.receive().payload) == 64 * KIB
    head.client.publish(act(1), b"b" * (64 * KIB + 1), qos=0)
    assert head.disconnected.wait(5), "the broker kept a client that sent too much"
    assert stage.sync() == []


def test_accepted_sockets_have_tcp_nodelay(broker, peer) -> None:
    peer("n1"), peer("n2")

    async def nodelay_flags(embedded: EmbeddedBroker) -> list[int]:
        transports = embedded._amqtt.connection_transports()  # white-box: the accepted sockets
        return [t.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
                for t in transports]

    assert broker.call(nodelay_flags) == [1, 1]


def test_silent_client_is_dropped_after_keepalive_and_its_will_published(peer, broker, raw_mqtt) -> None:
    planner = peer("planner")
    planner.subscribe((status("n1"), 1))
    sock = raw_mqtt.connect(broker.port, "n1", keepalive=1, will=(status("n1"), b"offline", 1, True))
    try:
        # keep-alive 1 s: the broker must give up after 1.5 s [MQTT-3.1.2-24] and send the will
        assert planner.receive(timeout=raw_mqtt.wait) == (status("n1"), b"offline", 1, False)
        assert raw_mqtt.closed_by_peer(sock)
    finally:
        sock.close()
    late = peer("late")
    late.subscribe(status("n1"))
    assert late.sync() == [(status("n1"), b"offline", 0, True)]


def test_reconnect_with_same_id_closes_the_old_connection_first(peer, broker, raw_mqtt) -> None:
    old = raw_mqtt.connect(broker.port, "n1", keepalive=60, will=(status("n1"), b"offline", 1, True))
    try:
        new = peer("n1")  # clean session, same client id: takes over [MQTT-3.1.4-2]
        assert raw_mqtt.closed_by_peer(old)
        new.publish(status("n1"), b"online", qos=1, retain=True)
    finally:
        old.close()
    watcher = peer("watcher")
    watcher.subscribe(status("n1"))
    assert watcher.sync() == [(status("n1"), b"online", 0, True)]  # the old will came first


def test_socket_without_connect_is_closed_after_connect_timeout(custom_broker, raw_mqtt) -> None:
    running, _ = custom_broker(connect_timeout=0.5)
    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as sock:
        assert raw_mqtt.closed_by_peer(sock, timeout=3)


def test_may_publish_drops_denied_publishes_and_refuses_denied_wills(custom_broker) -> None:
    def may_publish(client: ClientInfo, topic: str) -> bool:
        return not T.matches(T.NODE_STATUS.filter(), topic) or topic == status(client.client_id)

    _, peer = custom_broker(may_publish=may_publish)
    planner, n1 = peer("planner"), peer("n1")
    planner.subscribe(T.NODE_STATUS.filter(CLUSTER))
    n1.publish(status("n2"), b"forged", qos=1)
    n1.publish(status("n1"), b"online", qos=1)
    assert planner.sync() == [(status("n1"), b"online", 0, False)]
    impostor = peer("n3", connect=False)
    impostor.client.will_set(status("n2"), b"offline", qos=1, retain=True)
    assert impostor.connect(expect_success=False) == 135  # CONNACK 5: not authorized


def test_no_sys_topics_and_only_the_auth_plugin(broker, peer) -> None:
    # amqtt's default plugins log every packet through two asyncio tasks each and publish
    # $SYS/broker/... statistics; the embedded broker loads none of them.
    watcher = peer("watcher")
    watcher.subscribe("$SYS/#")
    assert watcher.sync() == []

    async def plugin_names(embedded: EmbeddedBroker) -> list[str]:
        return [type(p).__name__ for p in embedded._amqtt.plugins_manager.plugins]

    assert broker.call(plugin_names) == ["AnonymousAuthPlugin"]


def test_stopping_with_clients_connected_disconnects_them(custom_broker) -> None:
    running, peer = custom_broker()
    n1, n2 = peer("n1"), peer("n2")
    n1.subscribe(act(0))
    running.stop()  # bounded by its timeout; leaves no socket or task behind (filterwarnings=error)
    assert n1.disconnected.wait(5) and n2.disconnected.wait(5)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", n1.client.port), timeout=5).close()
