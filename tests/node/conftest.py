"""One tiny exported model (llama, GQA) for the node runtime tests, built once.

pytest runs with --import-mode=importlib: tests get these through fixtures only.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from linguamq.models.export import ExportOptions, export_model
from linguamq.models.tiny import TinySpec, make_tiny
from linguamq.schemas.manifest import ModelManifest


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, ModelManifest]:
    root = tmp_path_factory.mktemp("node-model")
    make_tiny(TinySpec(family="llama", layers=3, hidden=64, heads=4, kv_heads=2, vocab=320, seed=3), root / "hf")
    manifest = export_model(root / "hf", root / "art", ExportOptions(max_context=40))
    return root / "art", manifest
