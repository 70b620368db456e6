"""ModelManifest: what an exported model is made of (retained on `lmq/{cluster}/model`)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

from linguamq.schemas.errors import SchemaError
from linguamq.schemas.wire import ID_PATTERN, SHA256_PATTERN, Message, Struct, spec, struct

Dtype = Literal["float32", "float16", "int64", "int32"]
PieceKind = Literal["embed", "layer", "head"]


@struct
class TensorSpec(Struct):
    name: str = spec(max_len=128)
    dtype: Dtype
    shape: tuple[int | str, ...] = spec(ge=0, max_len=8, doc="ints, or names of dynamic dims")


@struct
class PieceSpec(Struct):
    """One ONNX file. FLOPs count a multiply-accumulate as 2.

    flops_per_token: decoding one token, all matmuls, attention over the cache excluded.
    flops_per_prompt_token: per prompt token during prefill (the head computes only the
        last position, so its cost is per prompt, not per token: 0 here).
    attn_flops_per_position: extra FLOPs per decoded token per cached position.
    """

    index: int = spec(ge=0, le=100_000)
    name: str = spec(max_len=64)
    kind: PieceKind
    file: str = spec(max_len=256)
    sha256: str = spec(pattern=SHA256_PATTERN)
    bytes: int = spec(ge=0)
    params: int = spec(ge=0)
    flops_per_token: int = spec(ge=0)
    flops_per_prompt_token: int = spec(ge=0)
    attn_flops_per_position: int = spec(ge=0)
    act_bytes_per_token: int = spec(ge=0)
    kv_bytes_per_token: int = spec(ge=0)
    inputs: tuple[TensorSpec, ...] = spec(max_len=16)
    outputs: tuple[TensorSpec, ...] = spec(max_len=16)


@struct
class ChatTemplateSpec(Struct):
    """The model's chat template, a Jinja file beside the tokenizer, and the special tokens it names."""

    file: str = spec(max_len=256)
    sha256: str = spec(pattern=SHA256_PATTERN)
    bos_token: str | None = spec(max_len=256, default=None)
    eos_token: str | None = spec(max_len=256, default=None)


@struct
class ModelManifest(Message):
    TYPE = "model_manifest"

    name: str = spec(max_len=128)
    family: Literal["llama", "qwen2", "bloom"]
    dtype: Literal["fp32", "fp16"]
    quantization: Literal["none", "int8", "int4"]
    hidden_size: int = spec(ge=1)
    num_layers: int = spec(ge=1)
    num_heads: int = spec(ge=1)
    num_kv_heads: int = spec(ge=1)
    head_dim: int = spec(ge=1)
    vocab_size: int = spec(ge=1)
    max_context: int = spec(ge=1)
    act_dtype: Literal["float32", "float16"]
    tokenizer_file: str = spec(max_len=256)
    tokenizer_sha256: str = spec(pattern=SHA256_PATTERN)
    eos_token_ids: tuple[int, ...] = spec(ge=0, max_len=64)
    bos_token_id: int | None = spec(ge=0)
    pieces: tuple[PieceSpec, ...] = spec(max_len=10_000)
    chat_template: ChatTemplateSpec | None = spec(default=None, doc="none: the model takes no `messages`")
    rope_inv_freq: tuple[float, ...] = spec(
        default=(), gt=0, max_len=4096,
        doc="rotary inverse frequencies (head_dim/2, scaling applied) of layers that take cos_cache/sin_cache")
    batch_rows: bool = spec(
        default=False,
        doc="every piece takes a batch of sessions, one row each, and computes each row as it would alone "
            "(no activation quantized per tensor): a node may run several sessions' decode steps as one call")

    def __post_init__(self) -> None:
        Struct.__post_init__(self)
        for i, piece in enumerate(self.pieces):
            if piece.index != i:
                raise SchemaError(f"piece index {piece.index} at position {i}", field=f"pieces[{i}].index")
        kinds = [p.kind for p in self.pieces]
        if kinds and (kinds[0] != "embed" or kinds[-1] != "head" or kinds.count("layer") != self.num_layers):
            raise SchemaError("pieces must be embed, num_layers layers, then head", field="pieces")

    def piece(self, index: int) -> PieceSpec:
        return self.pieces[index]


def file_sha256(path: Path) -> str:
    """The hash a manifest records for a file (``PieceSpec.sha256``, ``tokenizer_sha256``)."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


__all__ = ["ChatTemplateSpec", "ModelManifest", "PieceSpec", "TensorSpec", "ID_PATTERN", "file_sha256"]
