"""The gateway's HTTP edges, without a cluster: hosts it answers, errors in OpenAI's shape,
bodies it refuses, and when it asks for keys."""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from linguamq.gateway.app import LOOPBACK_HOSTS, MAX_BODY_BYTES, Gateway
from linguamq.gateway.settings import GatewaySettings, check_exposure


@pytest.fixture
def http() -> TestClient:
    secured = GatewaySettings(broker_url="mqtt://127.0.0.1:1", username="hub")  # no broker: nothing gets that far
    return TestClient(Gateway(secured, allowed_hosts=LOOPBACK_HOSTS).app, base_url="http://127.0.0.1:8000",
                      raise_server_exceptions=False)


def test_a_page_rebinding_its_name_to_loopback_reads_nothing(http: TestClient) -> None:
    assert http.get("/health").status_code == 200
    assert http.get("/health", headers={"Host": "attacker.example"}).status_code == 400
    assert http.get("/health", headers={"Host": "localhost:8000"}).status_code == 200


def test_unknown_paths_and_methods_answer_in_openais_error_shape(http: TestClient) -> None:
    missing = http.get("/v1/engines")
    assert missing.status_code == 404 and missing.json()["error"]["message"] == "Not Found"
    wrong = http.get("/v1/chat/completions")
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_without_a_key_nothing_is_answered(http: TestClient) -> None:
    assert http.post("/v1/chat/completions", content=b"{}").json()["error"]["code"] == "invalid_api_key"
    assert http.get("/api/state").status_code == 401


def test_credentials_in_the_broker_url_also_mean_every_caller_needs_a_key() -> None:
    assert GatewaySettings(broker_url="mqtt://admin:pw@127.0.0.1:1883").keys_required
    assert not GatewaySettings(broker_url="mqtt://127.0.0.1:1883").keys_required
    check_exposure("0.0.0.0", keys_required=True, open_=False)  # a secured cluster may face the network
    with pytest.raises(ValueError, match="--open"):
        check_exposure("0.0.0.0", keys_required=False, open_=False)
    check_exposure("::1", keys_required=False, open_=False)


def test_an_open_gateway_refuses_oversized_and_broken_bodies() -> None:
    gateway = Gateway(GatewaySettings(broker_url="mqtt://127.0.0.1:1"))
    gateway._own = object()  # type: ignore[assignment]  # an open cluster's own connection: never used here
    http = TestClient(gateway.app, base_url="http://127.0.0.1:8000", raise_server_exceptions=False)
    too_big = http.post("/v1/completions", content=b"x" * (MAX_BODY_BYTES + 1))
    assert too_big.status_code == 413 and too_big.json()["error"]["code"] == "request_too_large"
    nested = http.post("/v1/completions", content=b"[" * 100_000 + b"]" * 100_000)
    assert nested.status_code == 400 and nested.json()["error"]["message"] == "the request body is not JSON"
    null_role = http.post("/v1/chat/completions", json={"messages": [{"role": ["user"], "content": "Hi"}]})
    assert null_role.status_code == 400 and null_role.json()["error"]["param"] == "messages"
