"""Tiny model directories, one per family, built once per test session.

pytest runs with --import-mode=importlib: tests get these through fixtures only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from linguamq.models.tiny import TinySpec, make_tiny

FAMILIES = ("llama", "qwen2", "bloom")


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {f: _make(root / f, TinySpec(family=f, layers=2, hidden=64, heads=4, vocab=512, seed=1)) for f in FAMILIES}


def _make(path: Path, spec: TinySpec) -> Path:
    make_tiny(spec, path)
    return path


@pytest.fixture(scope="session")
def load_hf() -> Callable[[Path], Any]:
    """Loader of transformers' own implementation of a directory (float32, eval mode)."""
    return _load_hf


def _load_hf(path: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation and progress chatter
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()
