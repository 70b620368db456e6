"""Causal attention over a KV cache, shared by every family.

Positions are absolute: the cache holds keys for positions 0..S-1 and `position_ids`
gives the absolute position of each query, so a query at position p sees keys 0..p.
Grouped-query attention never repeats K/V: the query heads are viewed as
(kv_heads, group) and broadcast against their shared key/value head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_bias(position_ids: torch.Tensor, total: int | torch.Tensor) -> torch.Tensor:
    """(1, T) absolute query positions -> additive mask (T, S): 0 where visible, very negative elsewhere."""
    # Traced for export, a shape is a 0-d Tensor: arange takes one, though its stubs say a number.
    key_pos = torch.arange(total, device=position_ids.device)  # type: ignore[arg-type]  # (S,)
    visible = key_pos[None, :] <= position_ids[0][:, None]  # (T, S)
    return torch.where(visible, 0.0, torch.finfo(torch.float32).min)  # (T, S) float32


def attend(q: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *, scale: float,
           bias: torch.Tensor) -> torch.Tensor:
    """Softmax attention; softmax in float32 like HF, the rest in q's dtype.

    q: (B, heads, T, D); key/value: (B, kv_heads, S, D);
    bias: float32, broadcastable to (B, kv_heads, group, T, S).
    Returns (B, heads, T, D).
    """
    b, heads, t, d = q.shape
    kv_heads = key.shape[1]
    q = q.reshape(b, kv_heads, heads // kv_heads, t, d)  # (B, kv, group, T, D)
    scores = torch.matmul(q, key.unsqueeze(2).transpose(-1, -2)) * scale  # (B, kv, group, T, S)
    probs = F.softmax(scores.float() + bias, dim=-1).to(q.dtype)  # (B, kv, group, T, S)
    out = torch.matmul(probs, value.unsqueeze(2))  # (B, kv, group, T, D)
    return out.reshape(b, heads, t, d)
