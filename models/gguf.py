"""A GGUF file (llama.cpp's format) -> a checked Hugging Face-style model directory.

`gguf_to_model_dir(file, out)` writes config.json, model.safetensors (every tensor
dequantized to float32 by the `gguf` package, renamed to HF keys, Q/K rows un-permuted),
tokenizer.json, tokenizer_config.json (chat template, add_bos_token, BOS/EOS) and
generation_config.json; `export_model` then runs on that directory like on any other.
Anything we cannot read is refused before a tensor is touched, in one line.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from linguamq.models.errors import MissingFileError, ModelDirError, UnsupportedArchitectureError, UnsupportedDtypeError
from linguamq.models.gguf_tokenizer import GGUFTokenizerSpec, build_tokenizer

SUFFIX = ".gguf"
# GGUF architecture -> HF architecture. llama.cpp permutes Q/K rows only for llama.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
PERMUTED_QK = ("llama",)
# Tensor types `gguf.quants.dequantize` turns into floats (checked against gguf 0.19).
TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_NL", "IQ4_XS",
                "TQ1_0", "TQ2_0")
GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
BLOCK_TENSORS = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}

# Called after each tensor: (done, total, tensor name).
ReadProgress = Callable[[int, int, str], None]


def find_gguf(path: Path | str) -> Path | None:
    """The GGUF file `--model` names (the file, or a directory holding exactly one); None
    when it names something else (a Hugging Face directory)."""
    path = Path(path)
    if path.suffix == SUFFIX:
        if not path.is_file():
            raise MissingFileError(f"GGUF file {str(path)!r} does not exist")
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    files = sorted(path.glob(f"*{SUFFIX}"))
    if len(files) > 1:
        raise ModelDirError(f"{str(path)!r} holds {len(files)} .gguf files; name one with --model FILE.gguf")
    return files[0] if files else None


def gguf_to_model_dir(file: Path | str, out: Path | str, progress: ReadProgress | None = None) -> Path:
    """Write the Hugging Face-style directory `out` for GGUF `file`; returns `out`."""
    from gguf import GGUFReader  # the export extra only

    file, out = Path(file), Path(out)
    try:
        reader = GGUFReader(file)
    except (ValueError, OSError) as exc:
        raise ModelDirError(f"{file.name} is not a readable GGUF file: {exc}") from exc
    meta = _Metadata(reader, file.name)
    arch = _architecture(meta)
    _check_tensor_types(reader, file.name)
    config = _config(meta, arch, {t.name for t in reader.tensors}, _vocab_rows(reader))
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer_spec(meta)
    build_tokenizer(tokenizer).save(str(out / "tokenizer.json"))
    _write_json(out / "config.json", config)
    _write_json(out / "generation_config.json", _generation(tokenizer))
    _write_json(out / "tokenizer_config.json", _tokenizer_config(meta, tokenizer, config))
    save_file(_tensors(reader, config, arch, progress), str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


class _Metadata:
    """Typed access to a reader's key/value fields."""

    def __init__(self, reader: Any, file_name: str) -> None:
        self._fields = reader.fields
        self.file_name = file_name

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(key)
        return default if field is None else field.contents()

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ModelDirError(f"{self.file_name} lacks the GGUF metadata key {key!r}")
        return value


def _architecture(meta: _Metadata) -> str:
    arch = str(meta.need("general.architecture"))
    if arch not in ARCHITECTURES:
        raise UnsupportedArchitectureError(f"GGUF architecture {arch!r} in {meta.file_name} is not supported; "
                                           f"supported: {', '.join(ARCHITECTURES)}")
    return arch


def _check_tensor_types(reader: Any, file_name: str) -> None:
    for tensor in reader.tensors:
        if tensor.tensor_type.name not in TENSOR_TYPES:
            raise UnsupportedDtypeError(f"tensor {tensor.name!r} in {file_name} has GGUF type "
                                        f"{tensor.tensor_type.name}; supported: {', '.join(TENSOR_TYPES)}")


def _vocab_rows(reader: Any) -> int:
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            return int(tensor.shape[-1])  # GGUF lists dims innermost first: (hidden, vocab)
    raise ModelDirError("the GGUF file has no token_embd.weight tensor")


def _config(meta: _Metadata, arch: str, tensors: set[str], vocab: int) -> dict[str, Any]:
    """config.json from the `{arch}.*` keys; the tensors say what the metadata does not
    (a tied head has no output.weight, llama with attention biases has attn_q.bias)."""
    heads = int(meta.need(f"{arch}.attention.head_count"))
    hidden = int(meta.need(f"{arch}.embedding_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    if int(meta.get(f"{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise UnsupportedArchitectureError(f"{meta.file_name}: partial rotary embeddings are not supported")
    if "rope_freqs.weight" in tensors:
        raise UnsupportedArchitectureError(f"{meta.file_name}: llama3 RoPE scaling (rope_freqs) is not supported")
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    return {
        "architectures": [ARCHITECTURES[arch]], "model_type": arch, "torch_dtype": "float32",
        "vocab_size": vocab, "hidden_size": hidden, "num_hidden_layers": int(meta.need(f"{arch}.block_count")),
        "num_attention_heads": heads, "num_key_value_heads": int(meta.get(f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim, "intermediate_size": int(meta.need(f"{arch}.feed_forward_length")),
        "hidden_act": "silu", "rms_norm_eps": float(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 2048)),
        "rope_theta": float(meta.get(f"{arch}.rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": arch == "llama" and "blk.0.attn_q.bias" in tensors,
        "bos_token_id": None if bos is None else int(bos), "eos_token_id": None if eos is None else int(eos),
    } | _rope_scaling(meta, arch)


def _rope_scaling(meta: _Metadata, arch: str) -> dict[str, Any]:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return {}
    if kind != "linear":
        raise UnsupportedArchitectureError(f"{meta.file_name}: RoPE scaling {kind!r} is not supported "
                                           "(only 'linear')")
    return {"rope_scaling": {"rope_type": "linear", "factor": float(meta.need(f"{arch}.rope.scaling.factor"))}}


def _tokenizer_spec(meta: _Metadata) -> GGUFTokenizerSpec:
    tokens = tuple(str(t) for t in meta.need("tokenizer.ggml.tokens"))
    types = meta.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    return GGUFTokenizerSpec(
        model=str(meta.need("tokenizer.ggml.model")), pre=str(meta.get("tokenizer.ggml.pre", "default")),
        tokens=tokens, token_types=tuple(int(t) for t in types),
        merges=tuple(str(m) for m in meta.get("tokenizer.ggml.merges") or ()),
        bos_token_id=None if bos is None else int(bos), eos_token_id=None if eos is None else int(eos),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)))


def _generation(tok: GGUFTokenizerSpec) -> dict[str, Any]:
    return {k: v for k, v in (("bos_token_id", tok.bos_token_id), ("eos_token_id", tok.eos_token_id))
            if v is not None}


def _tokenizer_config(meta: _Metadata, tok: GGUFTokenizerSpec, config: dict[str, Any]) -> dict[str, Any]:
    raw = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": tok.add_bos_token,
           "add_eos_token": tok.add_eos_token, "model_max_length": config["max_position_embeddings"],
           "chat_template": meta.get("tokenizer.chat_template")}
    for name, token_id in (("bos_token", tok.bos_token_id), ("eos_token", tok.eos_token_id)):
        raw[name] = None if token_id is None else tok.tokens[token_id]
    return {k: v for k, v in raw.items() if v is not None}


def _tensors(reader: Any, config: dict[str, Any], arch: str, progress: ReadProgress | None) -> dict[str, np.ndarray]:
    """Every tensor as float32 under its HF name (unknown names are refused: a tensor we
    dropped silently would be a wrong model)."""
    from gguf.quants import dequantize

    out: dict[str, np.ndarray] = {}
    total = len(reader.tensors)
    for done, tensor in enumerate(reader.tensors, start=1):
        name = _hf_name(tensor.name)
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
        weights = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
        out[name] = _unpermute(weights, tensor.name, config) if arch in PERMUTED_QK else weights
        if progress is not None:
            progress(done, total, tensor.name)
    return out


def _hf_name(name: str) -> str:
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name]
    parts = name.split(".")  # blk.{i}.{kind}.{weight|bias}
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in BLOCK_TENSORS:
        return f"model.layers.{parts[1]}.{BLOCK_TENSORS[parts[2]]}.{parts[3]}"
    raise UnsupportedArchitectureError(f"GGUF tensor {name!r} is not supported")


def _unpermute(weights: np.ndarray, name: str, config: dict[str, Any]) -> np.ndarray:
    """Undo llama.cpp's interleaving of Q/K rows (its RoPE pairs adjacent rows; HF's, halves)."""
    kind = name.split(".")[2] if name.startswith("blk.") else ""
    if kind not in ("attn_q", "attn_k"):
        return weights
    heads = config["num_attention_heads"] if kind == "attn_q" else config["num_key_value_heads"]
    rows = weights.shape[0]
    return weights.reshape(heads, rows // heads // 2, 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
