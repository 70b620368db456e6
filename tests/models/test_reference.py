"""Our reference blocks against transformers on the same HF directory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from linguamq.models.config import parse_config
from linguamq.models.hf import load_model, open_model_dir
from linguamq.models.tiny import TinySpec, make_tiny

FAMILIES = ("llama", "qwen2", "bloom")
TOL = 1e-4


def _max_diff(path: Path, load_hf: Callable[[Path], Any], tokens: int = 24) -> float:
    ours, theirs = load_model(open_model_dir(path)), load_hf(path)
    ids = torch.randint(1, ours.config.vocab_size, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (ours(ids) - theirs(ids).logits).abs().max().item()


@pytest.mark.parametrize("family", FAMILIES)
def test_reference_logits_match_transformers(family: str, tiny_dirs: dict[str, Path], load_hf: Callable) -> None:
    assert _max_diff(tiny_dirs[family], load_hf) < TOL


@pytest.mark.parametrize(("name", "spec"), [
    ("llama3-rope", TinySpec(family="llama", extra_config=(
        ("rope_scaling", {"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                          "original_max_position_embeddings": 16}), ("rope_theta", 500000.0)))),
    ("linear-rope", TinySpec(family="llama", extra_config=(("rope_scaling", {"rope_type": "linear", "factor": 2.0}),))),
    ("llama-mha-tied-bias", TinySpec(family="llama", kv_heads=4, extra_config=(
        ("tie_word_embeddings", True), ("attention_bias", True)))),
    ("bloom-6-heads", TinySpec(family="bloom", hidden=96, heads=6)),  # ALiBi slopes for a non power of 2
])
def test_variants_match_transformers(name: str, spec: TinySpec, tmp_path: Path, load_hf: Callable) -> None:
    make_tiny(spec, tmp_path / name)
    assert _max_diff(tmp_path / name, load_hf, tokens=40) < TOL


def test_llama3_scaling_changes_the_frequencies() -> None:
    from linguamq.models.llama import rope_inv_freq

    base = dict(architectures=["LlamaForCausalLM"], vocab_size=300, hidden_size=64, num_hidden_layers=1,
                num_attention_heads=4, intermediate_size=128)
    plain = rope_inv_freq(parse_config(base))
    scaled = rope_inv_freq(parse_config(base | {"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}))
    assert torch.equal(plain[:1], scaled[:1])  # the highest frequency (wavelength 2 pi < 64/4) untouched
    assert torch.allclose(plain[-1] / 8.0, scaled[-1])  # the lowest divided by the factor


def test_config_reads_transformers5_rope_parameters() -> None:
    cfg = parse_config(dict(architectures=["Qwen2ForCausalLM"], vocab_size=300, hidden_size=64,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=128, rope_parameters={"rope_type": "default", "rope_theta": 1e6}))
    assert (cfg.family, cfg.rope_theta, cfg.qkv_bias, cfg.o_bias, cfg.num_kv_heads) == ("qwen2", 1e6, True, False, 2)


def test_mistral_is_llama_with_its_sliding_window() -> None:
    cfg = parse_config(dict(architectures=["MistralForCausalLM"], vocab_size=300, hidden_size=64,
                            num_hidden_layers=1, num_attention_heads=4, intermediate_size=128,
                            max_position_embeddings=32768, sliding_window=4096))
    assert (cfg.family, cfg.sliding_window) == ("llama", 4096)
