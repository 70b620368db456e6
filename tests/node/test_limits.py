"""Limits at the edges, without a broker: the client's payload cap (sending and
receiving), the head's max_tokens cap and per-client token bucket."""

from __future__ import annotations

import paho.mqtt.client as paho
import pytest

from linguamq import topics
from linguamq.hub.head import Head, HeadSettings
from linguamq.schemas.examples import MANIFEST
from linguamq.schemas.requests import ErrorReport, GenerateRequest, GenerateResult
from linguamq.topics.client import MqttClient, PayloadTooLarge


def test_the_client_refuses_to_send_a_payload_over_its_cap_with_a_clear_error() -> None:
    client = MqttClient(url="mqtt://127.0.0.1:1", client_id="t", max_payload=1000)
    with pytest.raises(PayloadTooLarge, match=r"payload of 1001 bytes exceeds max_payload 1000"):
        client.publish_raw("lmq-x", b"x" * 1001)


def test_a_received_payload_over_the_cap_is_rejected_before_decoding_and_counted() -> None:
    client = MqttClient(url="mqtt://127.0.0.1:1", client_id="t", max_payload=64)
    got: list[tuple[str, str]] = []
    client.default_reject = lambda topic, payload, exc: got.append((topic, str(exc)))
    name = topics.ACT.build("c", piece=0)
    client.subscribe(topics.ACT, name, lambda *a: got.append(("handled", "")))
    for size in (65, 10):
        msg = paho.MQTTMessage(topic=name.encode())
        msg.payload = b"\x00" * size
        client._on_message(client._client, None, msg)
    assert got[0] == (name, "payload of 65 bytes exceeds this client's limit of 64")
    assert "preamble" not in got[0][1] and "magic" in got[1][1]  # the small one reached the decoder
    assert client.rejected == 2


class FakeClient:
    """Records what the head publishes."""

    def __init__(self) -> None:
        self.results: list[GenerateResult] = []
        self.reports: list[dict] = []

    def publish(self, topic, name, payload, wait=None) -> None:
        if isinstance(payload, GenerateResult):
            self.results.append(payload)

    def report_error(self, cluster, **fields) -> None:
        self.reports.append(fields)


def head(**settings) -> tuple[Head, FakeClient]:
    client = FakeClient()
    return Head(client=client, manifest=MANIFEST, encode=lambda text: [5] * len(text.split()),
                decode=lambda ids: "", settings=HeadSettings(cluster="c", **settings)), client


def request(i: int, client: str = "cli", max_tokens: int = 4) -> GenerateRequest:
    return GenerateRequest(id=f"r{i}", prompt="hi there", max_tokens=max_tokens, client=client)


def test_max_tokens_over_the_hubs_cap_is_refused_as_too_large() -> None:
    h, client = head(max_tokens=12)
    h._on_request("t", request(1, max_tokens=13), False)
    assert client.results[0].error == "max_tokens 13 exceeds this hub's cap of 12 (--max-tokens)"
    assert client.reports[0]["code"] == "too_large" and client.reports[0]["to"] == "cli"
    h._on_request("t", request(2, max_tokens=12), False)
    assert len(client.results) == 1 and h.rejected == 1  # within the cap: queued, not refused


def test_a_client_beyond_its_burst_is_rate_limited_and_another_client_is_not() -> None:
    h, client = head(rate=0.001, burst=3)
    for i in range(5):
        h._on_request("t", request(i), False)
    h._on_request("t", request(9, client="other"), False)
    limited = [r for r in client.reports if r["code"] == "rate_limited"]
    assert [r["ref"] for r in limited] == ["r3", "r4"]
    assert all(r.error.startswith("rate limited: client cli sent more than") for r in client.results)
    assert {r.request for r in client.results} == {"r3", "r4"} and h.rejected == 2
    ErrorReport(reporter="head", topic="t", code=limited[0]["code"], message="m", ts=0.0)  # a wire code
