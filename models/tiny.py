"""Tiny deterministic random models written as real Hugging Face directories.

`make_tiny(TinySpec(...), out)` writes config.json, model.safetensors, tokenizer.json,
tokenizer_config.json and generation_config.json; `transformers` loads the result with
AutoModelForCausalLM / AutoTokenizer. Same spec -> same bytes.

Initialisation: embeddings N(0, 1), linear layers N(0, 1/fan_in) so attention is not
uniform, a strong MLP output (see MLP_GAIN) so greedy continuations wander instead of
repeating one token; norms and biases are random too, so a mis-mapped weight shows.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from linguamq.models.config import ModelConfig, parse_config
from linguamq.models.errors import ModelsError
from linguamq.models.hf import FAMILIES

FAMILY_NAMES = ("llama", "qwen2", "bloom")
EOS = "<|endoftext|>"
MIN_VOCAB = 260  # 256 byte tokens, the special token and a few merges
SEED_TEXT = """\
The quick brown fox jumps over the lazy dog. A small language model runs across several
phones on a home network; each phone holds a few layers and passes the hidden state to
the next one over MQTT. The broker carries telemetry, activations and the plan. When a
device slows down or leaves, the planner moves a boundary and the head re-fills the cache.
Once upon a time there was a little robot who liked to count the stars in the sky.
It counted one, two, three, four, five, six, seven, eight, nine and ten, then started again.
def main():\n    print("hello, world")\n    return 0\n
"""
SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "an", "el", "in", "or", "us",
             "th", "qu", "ph", "st", "ng", "ch", "b", "d", "f", "g", "p", "x", "y", "w", "1", "2")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TinySpec:
    family: str = "llama"
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int | None = None  # default: half the heads for llama/qwen2, all heads for bloom
    vocab: int = 512
    intermediate: int | None = None  # default: 8/3 * hidden rounded up to 32 (bloom: always 4 * hidden)
    seed: int = 0
    max_position: int = 2048
    extra_config: tuple[tuple[str, Any], ...] = ()  # config.json overrides, e.g. rope scaling


def make_tiny(spec: TinySpec, out: Path | str) -> ModelConfig:
    """Write the tiny model directory `out`; returns its parsed config."""
    if spec.family not in FAMILY_NAMES:
        raise ModelsError(f"unknown tiny family {spec.family!r}; choose one of {', '.join(FAMILY_NAMES)}")
    if spec.vocab < MIN_VOCAB:
        raise ModelsError(f"--vocab {spec.vocab} is too small: a byte-level tokenizer needs at least {MIN_VOCAB}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    raw = _config_json(spec)
    cfg = parse_config(raw)
    _write_json(out / "config.json", raw)
    _write_json(out / "generation_config.json", {"bos_token_id": 0, "eos_token_id": 0})
    save_file(_weights(cfg, spec.seed), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "tokenizer.json").write_text(_tokenizer(spec.vocab, spec.seed).to_str(), encoding="utf-8")
    _write_json(out / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS,
                                                "bos_token": EOS, "model_max_length": spec.max_position})
    return cfg


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _config_json(spec: TinySpec) -> dict[str, Any]:
    if spec.family == "bloom":
        if spec.kv_heads not in (None, spec.heads):
            raise ModelsError("bloom has no grouped-query attention: --kv-heads must equal --heads")
        raw = _bloom_config(spec)
    else:
        raw = _llama_config(spec)
    raw.update(dict(spec.extra_config))
    return raw


def _common(spec: TinySpec) -> dict[str, Any]:
    if spec.hidden % spec.heads:
        raise ModelsError(f"--hidden {spec.hidden} is not a multiple of --heads {spec.heads}")
    return {"vocab_size": spec.vocab, "hidden_size": spec.hidden, "bos_token_id": 0, "eos_token_id": 0,
            "torch_dtype": "float32", "initializer_range": 0.02, "use_cache": True}


def _llama_config(spec: TinySpec) -> dict[str, Any]:
    kv = spec.kv_heads or max(1, spec.heads // 2)
    if spec.heads % kv:
        raise ModelsError(f"--heads {spec.heads} is not a multiple of --kv-heads {kv}")
    qwen = spec.family == "qwen2"
    raw = _common(spec) | {
        "architectures": ["Qwen2ForCausalLM" if qwen else "LlamaForCausalLM"],
        "model_type": spec.family, "num_hidden_layers": spec.layers, "num_attention_heads": spec.heads,
        "num_key_value_heads": kv, "head_dim": spec.hidden // spec.heads,
        "intermediate_size": spec.intermediate or -(-8 * spec.hidden // 3 // 32) * 32,
        "hidden_act": "silu", "max_position_embeddings": spec.max_position, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0 if qwen else 10000.0, "tie_word_embeddings": qwen,
    }
    if qwen:
        raw |= {"use_sliding_window": False, "sliding_window": None, "max_window_layers": spec.layers}
    else:
        raw |= {"attention_bias": False, "mlp_bias": False}
    return raw


def _bloom_config(spec: TinySpec) -> dict[str, Any]:
    return _common(spec) | {
        "architectures": ["BloomForCausalLM"], "model_type": "bloom", "n_layer": spec.layers,
        "n_head": spec.heads, "layer_norm_epsilon": 1e-5, "apply_residual_connection_post_layernorm": False,
        "tie_word_embeddings": True, "hidden_dropout": 0.0, "attention_dropout": 0.0,
    }


def _weights(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    cls, _ = FAMILIES[cfg.family]
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in cls(cfg).state_dict().items()}
    if cfg.tie_word_embeddings:
        shapes.pop("lm_head.weight")
    rng = np.random.default_rng(seed)
    return {name: _init(name, shape, rng) for name, shape in shapes.items()}


# The MLP's output projection is strong and zero-sum per row. With tied embeddings the
# head scores every token against the residual, which holds the input token's own
# vector: a strong per-token MLP term stops greedy decoding from repeating that token,
# and zero-sum rows remove the constant that GELU's positive mean would add to every
# position (which pins BLOOM's output to one token).
MLP_OUT = ("down_proj", "dense_4h_to_h")
MLP_GAIN = 16.0


def _init(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    normal = rng.standard_normal(shape, dtype=np.float32)
    if name.endswith("embed_tokens.weight") or name.endswith("word_embeddings.weight"):
        return normal
    if "norm" in name or "ln_f." in name:
        return (1.0 + 0.1 * normal) if name.endswith("weight") else 0.1 * normal
    if name.endswith("bias"):
        return 0.1 * normal
    weight = normal / np.float32(np.sqrt(shape[1]))  # Linear (out, in): unit gain
    if name.split(".")[-2] in MLP_OUT:
        weight = np.float32(MLP_GAIN) * (weight - weight.mean(axis=1, keepdims=True))
    return weight


def _tokenizer(vocab: int, seed: int) -> Tokenizer:
    """Byte-level BPE trained on built-in text and seeded pseudo-words, exactly `vocab` ids."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(vocab, seed), trainer=trainer)
    missing = vocab - tok.get_vocab_size()
    if missing > 0:
        tok.add_tokens([f"<|extra_{i}|>" for i in range(missing)])
    return tok


def _corpus(vocab: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["".join(SYLLABLES[j] for j in rng.integers(0, len(SYLLABLES), rng.integers(1, 6)))
             for _ in range(max(0, vocab - 300) * 4)]
    lines = [" ".join(words[i:i + 16]) for i in range(0, len(words), 16)]
    return [SEED_TEXT] * 4 + lines
