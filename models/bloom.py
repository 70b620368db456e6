"""BLOOM: ALiBi attention, LayerNorm after the embedding, fused query_key_value.

Parameter names mirror the HF checkpoint (`transformer.h.{i}.self_attention.
query_key_value.weight`, ...). The fused projection is laid out per head as
(heads, 3, head_dim) along its output dimension, as in HF `BloomAttention._reshape`.
ALiBi adds `slope[h] * key_position` to the scores; softmax is shift invariant per
row, so absolute key positions give exactly HF's numbers.
"""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from linguamq.models.attention import attend, causal_bias
from linguamq.models.config import ModelConfig


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """(heads,) ALiBi slopes, HF `_get_alibi_slopes`."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** p for p in range(1, 1 + closest)]
    if closest != num_heads:
        extra = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        slopes += [extra ** p for p in range(1, 1 + 2 * min(closest, num_heads - closest), 2)]
    return torch.tensor(slopes, dtype=torch.float32)


def gelu(x: torch.Tensor) -> torch.Tensor:
    """HF `bloom_gelu_forward` (tanh approximation with its exact constants)."""
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.query_key_value = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.dense = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, bias: torch.Tensor, past_key: torch.Tensor,
                past_value: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, t, _ = x.shape
        fused = self.query_key_value(x).view(b, t, self.num_heads, 3, self.head_dim)  # (1, T, heads, 3, D)
        q, k, v = (fused[..., i, :].transpose(1, 2) for i in range(3))  # (1, heads, T, D)
        key = torch.cat((past_key, k), dim=2)  # (1, heads, P+T, D)
        value = torch.cat((past_value, v), dim=2)  # (1, heads, P+T, D)
        out = attend(q, key, value, scale=self.head_dim ** -0.5, bias=bias)  # (1, heads, T, D)
        return self.dense(out.transpose(1, 2).reshape(b, t, -1)), key, value  # (1, T, H)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(cfg.hidden_size, 4 * cfg.hidden_size)
        self.dense_4h_to_h = nn.Linear(4 * cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(gelu(self.dense_h_to_4h(x)))  # (1, T, H)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.self_attention = Attention(cfg)
        self.post_attention_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)
        self.residual_post_layernorm = cfg.residual_post_layernorm

    def forward(self, x: torch.Tensor, bias: torch.Tensor, past_key: torch.Tensor,
                past_value: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ln = self.input_layernorm(x)
        attn, key, value = self.self_attention(ln, bias, past_key, past_value)
        x = attn + (ln if self.residual_post_layernorm else x)  # (1, T, H)
        ln = self.post_attention_layernorm(x)
        x = self.mlp(ln) + (ln if self.residual_post_layernorm else x)  # (1, T, H)
        return x, key, value


class Transformer(nn.Module):
    slopes: torch.Tensor  # a buffer

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = nn.LayerNorm(cfg.hidden_size, eps=cfg.norm_eps)
        self.register_buffer("slopes", alibi_slopes(cfg.num_heads), persistent=False)


class BloomForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.transformer = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.transformer.word_embeddings.weight

    def embed_piece(self) -> nn.Module:
        return Embed(self.transformer.word_embeddings, self.transformer.word_embeddings_layernorm)

    def layer_piece(self, i: int) -> nn.Module:
        return Layer(cast(Block, self.transformer.h[i]), self.transformer.slopes)

    def head_piece(self) -> nn.Module:
        return Head(self.transformer.ln_f, self.lm_head)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full recompute, no cache: (1, T) -> logits (1, T, V) float32."""
        x = self.embed_piece()(input_ids)  # (1, T, H)
        pos = torch.arange(input_ids.shape[1])[None]  # (1, T)
        empty = x.new_zeros(1, self.config.num_heads, 0, self.config.head_dim)
        for i in range(self.config.num_layers):
            x, _, _ = self.layer_piece(i)(x, pos, empty, empty)
        return self.lm_head(self.transformer.ln_f(x)).float()


class Embed(nn.Module):
    def __init__(self, word_embeddings: nn.Embedding, layernorm: nn.LayerNorm) -> None:
        super().__init__()
        self.word_embeddings, self.word_embeddings_layernorm = word_embeddings, layernorm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.word_embeddings_layernorm(self.word_embeddings(input_ids))  # (1, T, H)


class Layer(nn.Module):
    slopes: torch.Tensor  # a buffer

    def __init__(self, block: Block, slopes: torch.Tensor) -> None:
        super().__init__()
        self.block = block
        self.register_buffer("slopes", slopes, persistent=False)

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor, past_key: torch.Tensor,
                past_value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        total = past_key.shape[2] + hidden.shape[1]
        key_pos = torch.arange(total, device=hidden.device).float()  # (S,)
        alibi = (self.slopes[:, None] * key_pos[None, :]).view(hidden.shape[0], -1, 1, 1, total)  # (1, heads, 1, 1, S)
        alibi = alibi.to(hidden.dtype).float()  # HF adds ALiBi in the activation dtype
        bias = alibi + causal_bias(position_ids, total)  # (1, heads, 1, T, S)
        return self.block(hidden, bias, past_key, past_value)


class Head(nn.Module):
    def __init__(self, ln_f: nn.LayerNorm, lm_head: nn.Linear) -> None:
        super().__init__()
        self.ln_f, self.lm_head = ln_f, lm_head

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(hidden[:, -1, :])).float()  # (1, V)
