"""Qwen2: the Llama blocks with biases on q/k/v (not on o), same checkpoint key names.

`parse_config` sets `qkv_bias=True, o_bias=False` for Qwen2; everything else (RMSNorm,
RoPE, GQA, SwiGLU, tied or untied embeddings) is `linguamq.models.llama`.
"""

from __future__ import annotations

from linguamq.models.config import ModelConfig
from linguamq.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(cfg)
