"""Tiny models of every family exported fp32, fp16 and int8, built once per session.

pytest runs with --import-mode=importlib: tests get these through fixtures only.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from linguamq.models.export import ExportOptions, export_model
from linguamq.models.tiny import TinySpec, make_tiny

FAMILIES = ("llama", "qwen2", "bloom")
VARIANTS = {"fp32": ExportOptions(), "fp16": ExportOptions(dtype="fp16"), "int8": ExportOptions(quantize="int8"),
            "int4": ExportOptions(quantize="int4")}


@pytest.fixture(scope="session")
def family_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tools-models")
    for family in FAMILIES:
        make_tiny(TinySpec(family=family, layers=3, hidden=64, heads=4, vocab=512, seed=11), root / family)
    return {family: root / family for family in FAMILIES}


@pytest.fixture(scope="session")
def family_artifacts(family_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """(family, "fp32" | "fp16" | "int8") -> artifact directory."""
    out = {}
    for family, path in family_dirs.items():
        for variant, options in VARIANTS.items():
            art = tmp_path_factory.mktemp(f"art-{family}-{variant}")
            export_model(path, art, options)
            out[family, variant] = art
    return out


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
