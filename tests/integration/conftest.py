"""Exported tiny models and a running local cluster, for the integration tests.

pytest runs with --import-mode=importlib: tests get these through fixtures only.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from linguamq.models.export import ExportOptions, export_model
from linguamq.models.tiny import TinySpec, make_tiny
from linguamq.tools.local import open_local
from linguamq.tools.testing.mosquitto import mosquitto as run_mosquitto

FAMILIES = ("llama", "qwen2", "bloom")


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """family -> artifact dir of a 3-layer tiny model (GQA for llama and qwen2)."""
    out = {}
    for family in FAMILIES:
        root = tmp_path_factory.mktemp(f"pipeline-{family}")
        make_tiny(TinySpec(family=family, layers=3, hidden=64, heads=4, vocab=512, seed=23), root / "hf")
        export_model(root / "hf", root / "art", ExportOptions())
        out[family] = root / "art"
    return out


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")  # SmolLM2's, in short


@pytest.fixture(scope="session")
def chat_artifacts(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama whose tokenizer_config.json holds a ChatML chat template, exported."""
    root = tmp_path_factory.mktemp("chat-llama")
    make_tiny(TinySpec(family="llama", layers=3, hidden=64, heads=4, vocab=512, seed=23), root / "hf")
    config_file = root / "hf" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(config | {"chat_template": CHATML}))
    export_model(root / "hf", root / "art", ExportOptions())
    return root / "art"


@pytest.fixture(scope="session")
def reference():
    """(artifact dir, prompt, max_tokens, sampling=None) -> run-local's token ids (cached);
    greedy unless ``sampling`` (the request's Sampling) is given."""
    cache: dict[tuple[str, str, int, object], tuple[int, ...]] = {}
    models: dict[str, object] = {}

    def run(art: Path, prompt: str, max_tokens: int, sampling=None) -> tuple[int, ...]:
        from linguamq.node.sampling import SamplingParams
        from linguamq.tools.local import generate_local
        key = (str(art), prompt, max_tokens, sampling)
        if key not in cache:
            local = models.setdefault(str(art), open_local(art))
            ids = local.tokenizer.encode(prompt).ids
            params = SamplingParams() if sampling is None else SamplingParams(
                temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p, seed=sampling.seed)
            result = generate_local(local.runtime, prompt_ids=ids, max_tokens=max_tokens, sampling=params,
                                    eos_token_ids=local.manifest.eos_token_ids)
            cache[key] = result.tokens
        return cache[key]

    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real mosquitto on a free 127.0.0.1 port; yields its URL."""
    with run_mosquitto(root=tmp_path_factory.mktemp("mosquitto")) as port:
        yield f"mqtt://127.0.0.1:{port}"
