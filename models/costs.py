"""What a piece costs, as the planner reads it from the manifest.

Definitions (all per piece, batch 1):
- FLOPs count matmuls only, a multiply-accumulate as 2 FLOPs: every `nn.Linear` of the
  piece costs 2 * in * out per token it processes. Norms, activations, RoPE, softmax and
  the embedding gather are not counted (they are O(hidden) per token, not O(hidden^2)).
- flops_per_token: decoding one token, attention over the cache excluded.
- flops_per_prompt_token: each prompt token during prefill. Equal to flops_per_token for
  embed and layers; 0 for the head, which computes the last position only, so a
  prefill of n tokens costs the head one flops_per_token, whatever n.
- attn_flops_per_position: layers only; one decoded token attending to one cached
  position: q.k (2 * heads * head_dim) plus probs.v (2 * heads * head_dim).
  A prefill of n tokens costs n * (n + 1) / 2 such units per layer.
- act_bytes_per_token: bytes of the piece's output per token: hidden_size * activation
  itemsize for embed and layers; the head's output is one float32 logit row (vocab * 4).
- kv_bytes_per_token: layers only; 2 (key, value) * kv_heads * head_dim * activation
  itemsize of cache this piece keeps per token of context.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from linguamq.models.config import ModelConfig

LOGIT_ITEMSIZE = 4  # the head always outputs float32 logits


@dataclasses.dataclass(frozen=True, kw_only=True)
class PieceCosts:
    params: int
    flops_per_token: int
    flops_per_prompt_token: int
    attn_flops_per_position: int
    act_bytes_per_token: int
    kv_bytes_per_token: int


def matmul_flops(module: nn.Module) -> int:
    """2 * in * out summed over the module's Linear layers: FLOPs for one token."""
    return sum(2 * m.in_features * m.out_features for m in module.modules() if isinstance(m, nn.Linear))


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def piece_costs(kind: str, module: nn.Module, cfg: ModelConfig, act_itemsize: int) -> PieceCosts:
    flops = matmul_flops(module)
    is_layer = kind == "layer"
    return PieceCosts(
        params=param_count(module),
        flops_per_token=flops,
        flops_per_prompt_token=0 if kind == "head" else flops,
        attn_flops_per_position=4 * cfg.num_heads * cfg.head_dim if is_layer else 0,
        act_bytes_per_token=cfg.vocab_size * LOGIT_ITEMSIZE if kind == "head" else cfg.hidden_size * act_itemsize,
        kv_bytes_per_token=2 * cfg.kv_dim * act_itemsize if is_layer else 0,
    )
