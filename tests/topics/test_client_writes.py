"""MqttClient writes a publish at once, from whichever thread makes it (paho would wait
for its network thread), without ever interleaving two packets on the socket."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator

import pytest

from linguamq.broker import BrokerThread
from linguamq.topics.client import MqttClient

pytestmark = pytest.mark.integration
WAIT = 10.0


@pytest.fixture
def url() -> Iterator[str]:
    with BrokerThread() as running:
        yield running.url


def test_a_publish_from_a_handler_leaves_before_the_handler_returns(url: str) -> None:
    """The head publishes the next step from its handler, then streams text: paho alone
    sent the step only once the handler had returned (here: once the test has looked)."""
    arrived, release, handler_done = threading.Event(), threading.Event(), threading.Event()
    with MqttClient(url=url, client_id="relay") as relay, MqttClient(url=url, client_id="sink") as sink:
        sink.subscribe_raw("t/out", lambda _msg: arrived.set(), qos=1, wait=WAIT)

        def relay_on(_msg: object) -> None:
            relay.publish_raw("t/out", b"next step", qos=1)
            release.wait(5.0)  # the handler's other work
            handler_done.set()

        relay.subscribe_raw("t/in", relay_on, qos=1, wait=WAIT)
        sink.publish_raw("t/in", b"token", qos=1)
        try:
            assert arrived.wait(3.0)
            assert not handler_done.is_set()  # it arrived while the handler still ran
        finally:
            release.set()


def test_publishes_from_many_threads_arrive_whole_and_in_order(url: str, callback_errors) -> None:
    """Four threads publish at once (sizes up to 96 KiB, so writes are partial) while the
    network thread writes PUBACKs for what the client receives: every message arrives
    intact, each thread's in its order."""
    threads, per_thread = 4, 150
    got: dict[int, list[int]] = {t: [] for t in range(threads)}
    done = threading.Event()
    lock = threading.Lock()

    def on_message(msg: object) -> None:
        payload = msg.payload  # type: ignore[attr-defined]
        thread, seq = int(payload[:2]), int(payload[2:8])
        body, digest = payload[8:-32], payload[-32:]
        assert hashlib.sha256(body).digest() == digest, "a packet was corrupted on the wire"
        with lock:
            got[thread].append(seq)
            if sum(map(len, got.values())) == threads * per_thread:
                done.set()

    def message(thread: int, seq: int) -> bytes:
        body = bytes([seq % 251]) * (1 + (seq * 7919) % (96 * 1024))
        return b"%02d%06d" % (thread, seq) + body + hashlib.sha256(body).digest()

    with MqttClient(url=url, client_id="multi") as client, MqttClient(url=url, client_id="echo") as echo:
        client.subscribe_raw("t/back", callback_errors.wrap(on_message), qos=1, wait=WAIT)
        echo.subscribe_raw("t/there", lambda msg: echo.publish_raw("t/back", msg.payload, qos=1), qos=1, wait=WAIT)

        def publish_all(thread: int) -> None:
            for seq in range(per_thread):
                client.publish_raw("t/there", message(thread, seq), qos=1)

        workers = [threading.Thread(target=publish_all, args=(t,)) for t in range(threads)]
        started = time.monotonic()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(WAIT)
        assert callback_errors.wait(done, max(WAIT - (time.monotonic() - started), 1.0)), \
            {t: len(s) for t, s in got.items()}
    assert all(seqs == list(range(per_thread)) for seqs in got.values())



def test_a_handler_publishing_while_another_thread_disconnects_does_not_deadlock(url: str) -> None:
    """A handler's publish must not write a DISCONNECT another thread queued meanwhile: paho
    then ran on_disconnect inside the message callback, whose lock the network thread held,
    and stop() hung for ever (the CI run that never finished). The race is forced: the
    disconnect comes between the handler's publish being queued and being written."""
    relay = MqttClient(url=url, client_id="relay-stop").start()
    paho_client = relay._client
    write, armed, raced = paho_client._packet_write, threading.Event(), threading.Event()

    def racing_write() -> object:
        if armed.is_set() and not raced.is_set() and threading.current_thread() is paho_client._thread:
            raced.set()
            other = threading.Thread(target=paho_client.disconnect, daemon=True)
            other.start()
            other.join(0.5)  # queued by now, unless it must wait for this write to finish
        return write()

    paho_client._packet_write = racing_write  # type: ignore[method-assign]
    with MqttClient(url=url, client_id="sink-stop") as sink:
        def relay_on(_msg: object) -> None:
            armed.set()
            relay.publish_raw("t/late", b"while another thread disconnects", qos=1)

        relay.subscribe_raw("t/go", relay_on, qos=1, wait=WAIT)
        sink.publish_raw("t/go", b"x", qos=1)
        deadline = time.monotonic() + WAIT
        while not raced.is_set():
            assert time.monotonic() < deadline, "the handler never published"
            time.sleep(0.01)
        stopper = threading.Thread(target=paho_client.loop_stop, daemon=True)
        stopper.start()
        stopper.join(WAIT)
        assert not stopper.is_alive(), "the network thread deadlocked"
