"""Llama family (Llama 2/3, TinyLlama, SmolLM, Mistral without sliding window, Qwen2).

nanoGPT-style: parameter names mirror the HF checkpoint keys
(`model.layers.{i}.self_attn.q_proj.weight`, ...), so a state dict loads as is.
Qwen2 is this module with q/k/v biases (`ModelConfig.qkv_bias`).

Every model exposes its pieces with the shared signatures:
  embed(input_ids (1, T) int64) -> hidden (1, T, H)
  layer(hidden (1, T, H), position_ids (1, T) int64, past_key, past_value (1, kv, P, D))
      -> hidden (1, T, H), present_key, present_value (1, kv, P+T, D)
  head(hidden (1, T, H)) -> logits (1, V) float32 of the last position
and `InPlaceLayer`, the layer as exported for ONNX Runtime (fused, its KV cache in place).
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from linguamq.models.attention import GroupQueryAttention, attend, causal_bias
from linguamq.models.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    """(head_dim / 2,) inverse frequencies, with `linear` or `llama3` scaling as in HF."""
    dim = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    if s.rope_type == "linear":
        return inv_freq / s.factor
    return _llama3_scaling(inv_freq, s.factor, s.low_freq_factor, s.high_freq_factor,
                           s.original_max_position_embeddings)


def _llama3_scaling(inv_freq: torch.Tensor, factor: float, low: float, high: float, old_ctx: int) -> torch.Tensor:
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_ctx / low, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_ctx / high) * ~(wavelen > old_ctx / low)
    return torch.where(medium, smoothed, scaled)


class Rotary(nn.Module):
    inv_freq: torch.Tensor  # a buffer

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq  # (1, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (1, 1, T, D)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + rotate_half(x) * sin  # (1, heads, T, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.kv_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=cfg.o_bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                past_key: torch.Tensor, past_value: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (1, heads, T, D)
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (1, kv, T, D)
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (1, kv, T, D)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        key = torch.cat((past_key, k), dim=2)  # (1, kv, P+T, D)
        value = torch.cat((past_value, v), dim=2)  # (1, kv, P+T, D)
        out = attend(q, key, value, scale=self.head_dim ** -0.5, bias=bias)  # (1, heads, T, D)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1)), key, value  # (1, T, H)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # (1, T, H)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bias: torch.Tensor,
                past_key: torch.Tensor, past_value: torch.Tensor) -> tuple[torch.Tensor, ...]:
        attn, key, value = self.self_attn(self.input_layernorm(x), cos, sin, bias, past_key, past_value)
        x = x + attn  # (1, T, H)
        x = x + self.mlp(self.post_attention_layernorm(x))  # (1, T, H)
        return x, key, value


class Model(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.rotary_emb = Rotary(cfg)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed_piece(self) -> nn.Module:
        return Embed(self.model.embed_tokens)

    def layer_piece(self, i: int) -> nn.Module:
        return Layer(cast(DecoderLayer, self.model.layers[i]), self.model.rotary_emb)

    def in_place_layer_piece(self, i: int) -> nn.Module:
        """The layer as exported for ONNX Runtime: its KV cache a buffer written in place."""
        return InPlaceLayer(cast(DecoderLayer, self.model.layers[i]), self.config)

    def head_piece(self) -> nn.Module:
        return Head(self.model.norm, self.lm_head)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full recompute, no cache: (1, T) -> logits (1, T, V) float32."""
        x = self.model.embed_tokens(input_ids)  # (1, T, H)
        pos = torch.arange(input_ids.shape[1])[None]  # (1, T)
        empty = x.new_zeros(1, self.config.num_kv_heads, 0, self.config.head_dim)
        for i in range(self.config.num_layers):
            x, _, _ = self.layer_piece(i)(x, pos, empty, empty)
        return self.lm_head(self.model.norm(x)).float()


class Embed(nn.Module):
    def __init__(self, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # (1, T, H)


class Layer(nn.Module):
    def __init__(self, layer: DecoderLayer, rotary: Rotary) -> None:
        super().__init__()
        self.layer, self.rotary = layer, rotary

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, past_key: torch.Tensor,
                past_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        cos, sin = self.rotary(position_ids, hidden.dtype)  # (1, 1, T, D)
        bias = causal_bias(position_ids, past_key.shape[2] + hidden.shape[1])  # (T, P+T)
        return self.layer(hidden, cos, sin, bias, past_key, past_value)


class InPlaceLayer(nn.Module):
    """`Layer` for ONNX Runtime's fused kernels: q/k/v as one matrix multiply, gate/up as
    another, and attention with rotary as one GroupQueryAttention over a KV buffer:

      hidden (1, T, H); past_key, past_value (1, kv, C, D) buffers holding P positions;
      seqlens_k (1,) int32 = P+T-1; total_sequence_length () int32 = P+T;
      cos_cache, sin_cache (>= P+T, D/2): cos/sin of position x `rope_inv_freq`
      -> hidden_out (1, T, H), present_key, present_value: the buffers with P..P+T-1 written.

    The fused weights are copies: build it for export, not beside a model that runs."""

    def __init__(self, layer: DecoderLayer, cfg: ModelConfig) -> None:
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.input_layernorm, self.post_attention_layernorm = layer.input_layernorm, layer.post_attention_layernorm
        self.qkv_proj = _fused(attn.q_proj, attn.k_proj, attn.v_proj)
        self.o_proj, self.down_proj = attn.o_proj, mlp.down_proj
        self.gate_up_proj = _fused(mlp.gate_proj, mlp.up_proj)
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.intermediate_size = cfg.intermediate_size

    def forward(self, hidden: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
                seqlens_k: torch.Tensor, total_sequence_length: torch.Tensor, cos_cache: torch.Tensor,
                sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out, key, value = GroupQueryAttention.apply(
            self.qkv_proj(self.input_layernorm(hidden)), past_key, past_value, seqlens_k, total_sequence_length,
            cos_cache, sin_cache, self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5)
        x = hidden + self.o_proj(out)  # (1, T, H)
        gate, up = self.gate_up_proj(self.post_attention_layernorm(x)).split(self.intermediate_size, dim=-1)
        return x + self.down_proj(F.silu(gate) * up), key, value


def _fused(*linears: nn.Linear) -> nn.Linear:
    """One Linear whose outputs are those of ``linears`` side by side."""
    fused = nn.Linear(linears[0].in_features, sum(lin.out_features for lin in linears),
                      bias=linears[0].bias is not None, dtype=linears[0].weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([lin.weight for lin in linears]))
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([lin.bias for lin in linears]))
    return fused


class Head(nn.Module):
    def __init__(self, norm: RMSNorm, lm_head: nn.Linear) -> None:
        super().__init__()
        self.norm, self.lm_head = norm, lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        last = self.norm(hidden[:, -1, :])  # (1, H)
        return self.lm_head(last).float()  # (1, V)
