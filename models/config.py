"""ModelConfig: the few numbers of a Hugging Face `config.json` that our blocks need.

`parse_config(dict)` maps the HF spellings of the supported architectures onto one
frozen dataclass and refuses (one clear line) anything we do not implement.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from linguamq.models.errors import UnsupportedArchitectureError, UnsupportedDtypeError

Family = Literal["llama", "qwen2", "bloom"]

# HF architecture name -> our family. Mistral is Llama without the sliding window.
ARCHITECTURES: dict[str, Family] = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "BloomForCausalLM": "bloom",
}
SUPPORTED_DTYPES = ("float32", "float16", "bfloat16")
ROPE_TYPES = ("default", "linear", "llama3")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling: `linear` (factor) or `llama3` (all four fields)."""

    rope_type: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    family: Family
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    torch_dtype: str = "float32"
    # llama / qwen2
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    sliding_window: int | None = None
    # bloom
    residual_post_layernorm: bool = False
    # generation
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim


def parse_config(raw: dict[str, Any]) -> ModelConfig:
    """HF `config.json` (already decoded) -> ModelConfig; raises on anything unsupported."""
    arch = _architecture(raw)
    family = ARCHITECTURES[arch]
    common: dict[str, Any] = dict(family=family, architecture=arch, torch_dtype=_dtype(raw),
                                  bos_token_id=raw.get("bos_token_id"), eos_token_ids=_ids(raw.get("eos_token_id")))
    if family == "bloom":
        return ModelConfig(**common, **_bloom_fields(raw))
    return ModelConfig(**common, **_llama_fields(raw, family))


def _architecture(raw: dict[str, Any]) -> str:
    archs = raw.get("architectures") or []
    if not archs:
        raise UnsupportedArchitectureError("config.json has no 'architectures' entry; "
                                           f"supported: {', '.join(ARCHITECTURES)}")
    for arch in archs:
        if arch in ARCHITECTURES:
            return arch
    raise UnsupportedArchitectureError(f"unsupported architecture {archs[0]!r} in config.json; "
                                       f"supported: {', '.join(ARCHITECTURES)}")


def _dtype(raw: dict[str, Any]) -> str:
    dtype = raw.get("dtype") or raw.get("torch_dtype") or "float32"
    if dtype not in SUPPORTED_DTYPES:
        raise UnsupportedDtypeError(f"config.json dtype {dtype!r} is not supported; "
                                    f"supported: {', '.join(SUPPORTED_DTYPES)}")
    if raw.get("quantization_config"):
        raise UnsupportedDtypeError("config.json has a quantization_config: pre-quantized checkpoints are not "
                                    "supported (export from the float weights with --quantize int8)")
    return dtype


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def _need(raw: dict[str, Any], *names: str) -> Any:
    for name in names:
        if raw.get(name) is not None:
            return raw[name]
    raise UnsupportedArchitectureError(f"config.json lacks {names[0]!r}")


def _llama_fields(raw: dict[str, Any], family: Family) -> dict[str, Any]:
    hidden, heads = int(_need(raw, "hidden_size")), int(_need(raw, "num_attention_heads"))
    if raw.get("hidden_act", "silu") != "silu":
        raise UnsupportedArchitectureError(f"hidden_act {raw['hidden_act']!r} is not supported (only 'silu')")
    theta, scaling = _rope(raw)
    qwen = family == "qwen2"
    return dict(
        vocab_size=int(_need(raw, "vocab_size")), hidden_size=hidden,
        num_layers=int(_need(raw, "num_hidden_layers")), num_heads=heads,
        num_kv_heads=int(raw.get("num_key_value_heads") or heads),
        head_dim=int(raw.get("head_dim") or hidden // heads),
        intermediate_size=int(_need(raw, "intermediate_size")),
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rope_theta=theta, rope_scaling=scaling,
        qkv_bias=True if qwen else bool(raw.get("attention_bias", False)),
        o_bias=False if qwen else bool(raw.get("attention_bias", False)),
        mlp_bias=False if qwen else bool(raw.get("mlp_bias", False)),
        sliding_window=_sliding_window(raw, qwen),
    )


def _sliding_window(raw: dict[str, Any], qwen: bool) -> int | None:
    if qwen and not raw.get("use_sliding_window", False):
        return None
    window = raw.get("sliding_window")
    return int(window) if window else None


def _rope(raw: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    # transformers >= 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`.
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UnsupportedArchitectureError(f"rope type {rope_type!r} is not supported; "
                                           f"supported: {', '.join(ROPE_TYPES)}")
    if rope_type == "default":
        return theta, None
    fields = {f.name for f in dataclasses.fields(RopeScaling)}
    return theta, RopeScaling(**{k: v for k, v in params.items() if k in fields} | {"rope_type": rope_type})


def _bloom_fields(raw: dict[str, Any]) -> dict[str, Any]:
    hidden = int(_need(raw, "hidden_size", "n_embed"))
    heads = int(_need(raw, "n_head", "num_attention_heads"))
    return dict(
        vocab_size=int(_need(raw, "vocab_size")), hidden_size=hidden,
        num_layers=int(_need(raw, "n_layer", "num_hidden_layers")), num_heads=heads,
        num_kv_heads=heads, head_dim=hidden // heads, intermediate_size=4 * hidden,
        norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        max_position_embeddings=int(raw.get("seq_length") or raw.get("max_position_embeddings") or 2048),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        residual_post_layernorm=bool(raw.get("apply_residual_connection_post_layernorm", False)),
    )
