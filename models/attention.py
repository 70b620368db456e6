"""Causal attention over a KV cache, shared by every family.

Positions are absolute: the cache holds keys for positions 0..S-1 and `position_ids`
gives the absolute position of each query, so a query at position p sees keys 0..p.
Grouped-query attention never repeats K/V: the query heads are viewed as
(kv_heads, group) and broadcast against their shared key/value head.

Two cache layouts: `attend` over past + new keys concatenated (every family; the cache
grows by a copy each step), and `GroupQueryAttention` over a buffer written in place
(rotary families: ONNX Runtime's fused kernel, no copy of the cache per step).
"""

from __future__ import annotations

from typing import Any

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


class GroupQueryAttention(torch.autograd.Function):
    """Attention with rotary over a KV buffer written in place: ONNX Runtime's
    `com.microsoft::GroupQueryAttention` once exported, the same arithmetic in eager torch.

    qkv: (1, T, (heads + 2 kv) * D), packed, before rotary; past_key/past_value: (1, kv, C, D),
    a buffer of capacity C whose first P positions are the cache; seqlens_k: (1,) int32 = P+T-1;
    total: 0-d int32 = P+T; cos_cache/sin_cache: (>= P+T, D/2), rows by absolute position
    (rotate-half layout). Returns the output (1, T, heads*D) and the buffers with positions
    P..P+T-1 written (ONNX Runtime writes them in place when past and present share memory).
    """

    @staticmethod
    def forward(ctx: object, qkv: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
                seqlens_k: torch.Tensor, total: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                num_heads: int, kv_heads: int, head_dim: int,
                scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        b, t, _ = qkv.shape
        d = head_dim
        end = int(seqlens_k[0]) + 1
        start = end - t
        q, k, v = qkv.view(b, t, num_heads + 2 * kv_heads, d).split((num_heads, kv_heads, kv_heads), dim=2)
        cos = torch.cat((cos_cache[start:end],) * 2, dim=-1)[None, :, None].to(qkv.dtype)  # (1, T, 1, D)
        sin = torch.cat((sin_cache[start:end],) * 2, dim=-1)[None, :, None].to(qkv.dtype)
        q, k = (x * cos + torch.cat((-x[..., d // 2:], x[..., :d // 2]), dim=-1) * sin for x in (q, k))
        key, value = past_key.clone(), past_value.clone()
        key[:, :, start:end], value[:, :, start:end] = k.transpose(1, 2), v.transpose(1, 2)
        bias = causal_bias(torch.arange(start, end)[None], end)  # (T, P+T)
        out = attend(q.transpose(1, 2), key[:, :, :end], value[:, :, :end], scale=scale, bias=bias)  # (1, heads, T, D)
        return out.transpose(1, 2).reshape(b, t, num_heads * d), key, value

    @staticmethod
    def symbolic(g: Any, qkv: Any, past_key: Any, past_value: Any, seqlens_k: Any, total: Any, cos_cache: Any,
                 sin_cache: Any, num_heads: int, kv_heads: int, head_dim: int, scale: float) -> Any:
        none = g.op("prim::Constant")  # key and value: absent, packed in qkv
        none.setType(torch._C.NoneType.get())
        outputs = g.op("com.microsoft::GroupQueryAttention", qkv, none, none, past_key, past_value, seqlens_k, total,
                       cos_cache, sin_cache, num_heads_i=num_heads, kv_num_heads_i=kv_heads, scale_f=scale,
                       do_rotary_i=1, rotary_interleaved_i=0, outputs=3)
        # The exporter cannot infer a contrib op's shapes: the outputs' are declared here.
        outputs[0].setType(qkv.type().with_sizes([None, None, num_heads * head_dim]))
        outputs[1].setType(past_key.type().with_sizes([None, kv_heads, None, head_dim]))
        outputs[2].setType(past_value.type().with_sizes([None, kv_heads, None, head_dim]))
        return outputs
