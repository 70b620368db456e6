"""Tiny models: deterministic bytes, real HF directories, non-degenerate greedy output."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from linguamq.models.errors import ModelsError
from linguamq.models.tiny import TinySpec, make_tiny

FAMILIES = ("llama", "qwen2", "bloom")
FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@pytest.mark.parametrize("family", FAMILIES)
def test_same_spec_same_bytes_other_seed_other_weights(family: str, tmp_path: Path) -> None:
    spec = TinySpec(family=family, vocab=400, seed=5)
    make_tiny(spec, tmp_path / "a")
    make_tiny(spec, tmp_path / "b")
    make_tiny(TinySpec(family=family, vocab=400, seed=6), tmp_path / "c")
    for name in FILES:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert (tmp_path / "a" / "model.safetensors").read_bytes() != (tmp_path / "c" / "model.safetensors").read_bytes()


@pytest.mark.parametrize("family", FAMILIES)
def test_transformers_loads_model_and_tokenizer(family: str, tiny_dirs: dict[str, Path], load_hf: Callable) -> None:
    from transformers import AutoTokenizer

    model = load_hf(tiny_dirs[family])
    assert model.config.model_type == family
    assert model.config.vocab_size == 512
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tok = AutoTokenizer.from_pretrained(tiny_dirs[family])
    assert len(tok) == 512
    text = "Once upon a time, 42 robots."
    assert tok.decode(tok(text)["input_ids"]) == text
    assert tok.eos_token_id == model.config.eos_token_id == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_continuations_are_not_degenerate(family: str, tiny_dirs: dict[str, Path], load_hf: Callable) -> None:
    model = load_hf(tiny_dirs[family])
    ids = torch.randint(1, 512, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=48, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    assert len(set(out[0, 24:].tolist())) >= 12


def test_bad_specs_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelsError, match="--kv-heads"):
        make_tiny(TinySpec(family="bloom", heads=4, kv_heads=2), tmp_path / "x")
    with pytest.raises(ModelsError, match="multiple"):
        make_tiny(TinySpec(family="llama", hidden=60, heads=8), tmp_path / "x")
    with pytest.raises(ModelsError, match="unknown tiny family"):
        make_tiny(TinySpec(family="gpt2"), tmp_path / "x")
