"""An int4 export through a hub and two node processes: the tokens run-local gives."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from linguamq.client import generate_remote, new_request_id
from linguamq.models.export import ExportOptions, export_model
from linguamq.models.tiny import TinySpec, make_tiny
from linguamq.schemas.requests import GenerateRequest
from linguamq.tools.testing.cluster import LocalCluster, NodeSpec
from linguamq.topics.client import MqttClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def int4_art(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("int4")
    make_tiny(TinySpec(family="qwen2", layers=3, hidden=64, heads=4, vocab=512, seed=23), root / "hf")
    export_model(root / "hf", root / "art", ExportOptions(quantize="int4"))
    return root / "art"


@pytest.fixture(scope="module")
def cluster(int4_art: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalCluster, MqttClient]]:
    with LocalCluster(artifacts=int4_art, nodes=[NodeSpec("a"), NodeSpec("b")], workdir=tmp_path_factory.mktemp("c"),
                      cluster="int4", objective="even") as c:
        with MqttClient(url=c.url, client_id="test-int4") as client:
            c.wait_ready(client, nodes=2, timeout=90)
            yield c, client


def test_int4_pieces_split_over_two_nodes_give_run_locals_tokens(cluster, int4_art: Path, reference) -> None:
    c, client = cluster
    assert c.plan is not None and len(c.plan.stages) == 2  # each node runs 4-bit pieces of its own
    for prompt in ("Hello world", "MQTT carries tensors"):
        request = GenerateRequest(id=new_request_id(), prompt=prompt, max_tokens=24)
        result = generate_remote(client, c.cluster, request, timeout=60)
        assert result.error is None, result.error
        assert result.tokens == reference(int4_art, prompt, 24)
