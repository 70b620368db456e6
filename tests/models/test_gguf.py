"""GGUF import: tiny models written as GGUF by the `gguf` writer, exported by our path,
generate the same greedy tokens as transformers loading the same file."""

from __future__ import annotations

import json
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file
from tokenizers import Tokenizer, decoders

from linguamq.models.errors import ModelsError
from linguamq.models.export import ExportOptions, export_model
from linguamq.models.gguf import find_gguf, gguf_to_model_dir
from linguamq.models.tiny import TinySpec, make_tiny
from linguamq.tools.cli import main
from linguamq.tools.local import generate_local, open_local

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType

PROMPTS = ("The quick brown fox jumps over", "日本語のテキストと中文", "emoji 😀🎉 party time!")
NEW_TOKENS = 12
# HF key (after "model.layers.{i}.") -> llama.cpp's name, written here independently of models/gguf.py.
BLOCK = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
         "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
       "lm_head.weight": "output.weight"}
BLOOM_BLOCK = {"input_layernorm": "attn_norm", "self_attention.query_key_value": "attn_qkv",
               "self_attention.dense": "attn_output", "post_attention_layernorm": "ffn_norm",
               "mlp.dense_h_to_4h": "ffn_up", "mlp.dense_4h_to_h": "ffn_down"}
BLOOM_TOP = {"transformer.word_embeddings.weight": "token_embd.weight",
             "transformer.word_embeddings_layernorm.weight": "token_embd_norm.weight",
             "transformer.word_embeddings_layernorm.bias": "token_embd_norm.bias",
             "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias"}
CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gguf-hf")
    out = {}
    for family in ("llama", "qwen2", "bloom"):
        make_tiny(TinySpec(family=family, layers=2, hidden=64, heads=4, vocab=512, seed=3), root / family)
        out[family] = root / family
    for family in ("llama", "qwen2"):  # K-quant blocks hold 256 weights: rows must be that long
        wide = root / f"{family}-wide"
        make_tiny(TinySpec(family=family, layers=2, hidden=256, heads=4, intermediate=512, vocab=512, seed=3), wide)
        out[f"{family}-wide"] = wide
    return out


def write_gguf(hf_dir: Path, path: Path, *, qtype: Any, pre: str, add_bos: bool | None, arch: str | None = None,
               eot: int | None = None, extra: dict[str, np.ndarray] | None = None) -> Path:
    """The tiny HF directory as llama.cpp's converter would write it (Q/K permuted for llama)."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    arch = arch or cfg["model_type"]
    writer = gguf.GGUFWriter(str(path), arch)
    _write_hparams(writer, arch, cfg)
    if pre == "sentencepiece":
        _write_sentencepiece(writer, hf_dir / "tokenizer.json", cfg["vocab_size"])
    else:
        _write_tokenizer(writer, hf_dir / "tokenizer.json", pre=pre, add_bos=bool(add_bos))
    if eot is not None:
        writer.add_eot_token_id(eot)
    tensors = load_file(str(hf_dir / "model.safetensors"))
    if cfg["model_type"] == "bloom":  # llama.cpp writes the tied head out too
        tensors["lm_head.weight"] = tensors["transformer.word_embeddings.weight"]
    for key, value in tensors.items():
        if cfg["model_type"] == "llama" and key.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg["num_attention_heads"] if "q_proj" in key else cfg["num_key_value_heads"]
            value = _permute(value, heads)
        if key.endswith("query_key_value.weight") or key.endswith("query_key_value.bias"):
            value = _group_qkv(value, cfg["n_head"])
        _add_tensor(writer, _gguf_name(key), value, qtype)
    for name, value in (extra or {}).items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _write_hparams(writer: Any, arch: str, cfg: dict[str, Any]) -> None:
    if cfg["model_type"] == "bloom":
        _write_bloom_hparams(writer, cfg)
        return
    writer.add_context_length(cfg["max_position_embeddings"])
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["num_hidden_layers"])
    writer.add_feed_forward_length(cfg["intermediate_size"])
    writer.add_head_count(cfg["num_attention_heads"])
    writer.add_head_count_kv(cfg["num_key_value_heads"])
    writer.add_rope_dimension_count(cfg["head_dim"])
    writer.add_rope_freq_base(cfg["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])


def _write_bloom_hparams(writer: Any, cfg: dict[str, Any]) -> None:
    writer.add_context_length(2048)
    writer.add_embedding_length(cfg["hidden_size"])
    writer.add_block_count(cfg["n_layer"])
    writer.add_feed_forward_length(4 * cfg["hidden_size"])
    writer.add_head_count(cfg["n_head"])
    writer.add_head_count_kv(cfg["n_head"])
    writer.add_layer_norm_eps(cfg["layer_norm_epsilon"])


def _write_tokenizer(writer: Any, file: Path, *, pre: str, add_bos: bool) -> None:
    tok = Tokenizer.from_file(str(file))
    added = tok.get_added_tokens_decoder()
    vocab = sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
    merges = json.loads(file.read_text())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list([t for t, _ in vocab])
    writer.add_token_types([(3 if added[i].special else 4) if i in added else 1 for _, i in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template(CHAT_TEMPLATE)


def _write_sentencepiece(writer: Any, file: Path, size: int) -> None:
    """A SentencePiece-style vocabulary ("llama" model): <unk> <s> </s>, 256 byte tokens, then
    the tiny BPE's tokens as text ("▁" for a space) scored by rank; no merges, no add_bos_token
    (llama.cpp's default for this model is to add BOS)."""
    pieces: dict[str, None] = {}
    for token, _ in sorted(Tokenizer.from_file(str(file)).get_vocab().items(), key=lambda kv: kv[1]):
        text = decoders.ByteLevel().decode([token]).replace(" ", "\u2581")
        if text and "\ufffd" not in text and not text.startswith("<|"):
            pieces.setdefault(text)
    specials, byte_tokens = ["<unk>", "<s>", "</s>"], [f"<0x{b:02X}>" for b in range(256)]
    words = list(pieces)[:size - len(specials) - len(byte_tokens)]
    writer.add_tokenizer_model("llama")
    writer.add_token_list(specials + byte_tokens + words)
    writer.add_token_scores([0.0] * (len(specials) + len(byte_tokens)) + [-float(i) for i in range(len(words))])
    writer.add_token_types([2, 3, 3] + [6] * len(byte_tokens) + [1] * len(words))
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf: RoPE pairs become adjacent rows."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _group_qkv(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's BLOOM converter: per-head (q, k, v) rows become all q, all k, all v."""
    grouped = w.reshape(heads, 3, w.shape[0] // heads // 3, *w.shape[1:])
    return np.concatenate([grouped[:, i].reshape(-1, *w.shape[1:]) for i in range(3)], axis=0)


def _gguf_name(key: str) -> str:
    if key in TOP or key in BLOOM_TOP:
        return TOP.get(key) or BLOOM_TOP[key]
    _, _, layer, rest = key.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{BLOCK.get(module) or BLOOM_BLOCK[module]}.{kind}"


# Per K-quant type: byte offset of each block's float16 scale d and, for the types with a
# minimum, dmin / d that centres random blocks on zero (a mean of 7.5 or 15.5 quanta).
K_SCALES = {Q.Q4_K: (0, 7.5), Q.Q5_K: (0, 15.5), Q.Q6_K: (208, 0.0)}


def _add_tensor(writer: Any, name: str, value: np.ndarray, qtype: Any) -> None:
    if value.ndim == 1 or qtype == Q.F32:  # llama.cpp keeps norms and biases in F32
        writer.add_tensor(name, value.astype(np.float32))
    elif qtype in K_SCALES:
        writer.add_tensor(name, _random_k_blocks(value.shape, qtype, zlib.crc32(name.encode())), raw_dtype=qtype)
    elif qtype in (Q.F16, Q.F64):  # F64: a type no GGUF model uses and we do not read
        writer.add_tensor(name, value.astype(np.float16 if qtype == Q.F16 else np.float64))
    else:
        writer.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)


def _random_k_blocks(shape: tuple[int, ...], qtype: Any, seed: int) -> np.ndarray:
    """Random valid blocks of a K-quant type (gguf.quants cannot quantize to them): both readers
    see the same bytes, so this checks the layout, not the weights. Scaled to std 1/sqrt(fan_in)."""
    block_weights, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = np.random.default_rng(seed).integers(0, 256, (shape[0], shape[1] // block_weights * block_bytes),
                                               dtype=np.uint8)
    _set_k_scales(raw.reshape(-1, block_bytes), qtype, 0.01)
    _set_k_scales(raw.reshape(-1, block_bytes), qtype,
                  0.01 / np.sqrt(shape[1]) / float(gguf.quants.dequantize(raw, qtype).std()))
    return raw


def _set_k_scales(blocks: np.ndarray, qtype: Any, d: float) -> None:
    offset, min_ratio = K_SCALES[qtype]
    blocks[:, offset:offset + 2] = np.full((len(blocks), 1), d, np.float16).view(np.uint8)
    if min_ratio:  # dmin follows d in Q4_K and Q5_K
        blocks[:, offset + 2:offset + 4] = np.full((len(blocks), 1), d * min_ratio, np.float16).view(np.uint8)


def _hf_greedy(folder: Path, name: str, prompt: str, eos: int) -> tuple[list[int], list[int]]:
    """transformers on the same GGUF: (prompt ids, greedy ids up to and including EOS)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' deprecation and progress chatter
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    new = out[0, ids.shape[1]:].tolist()
    return ids[0].tolist(), new[:new.index(eos) + 1] if eos in new else new


CASES = [("llama", Q.F32, "llama-bpe", True), ("llama", Q.F16, "default", False),
         ("llama", Q.Q8_0, "smollm", True), ("llama", Q.Q4_0, "llama-bpe", False),
         ("qwen2", Q.F32, "qwen2", False), ("qwen2", Q.F16, "qwen2", True),
         ("qwen2", Q.Q8_0, "qwen2", False), ("qwen2", Q.Q4_1, "qwen2", False),
         ("bloom", Q.F16, "default", False), ("bloom", Q.Q8_0, "default", True),
         ("llama-wide", Q.Q4_K, "llama-bpe", True), ("qwen2-wide", Q.Q6_K, "qwen2", False),
         ("llama-wide", Q.Q5_K, "default", False), ("llama", Q.Q8_0, "sentencepiece", None)]


@pytest.mark.slow
@pytest.mark.parametrize(("family", "qtype", "pre", "add_bos"), CASES,
                         ids=[f"{f}-{q.name}-{p}" for f, q, p, _ in CASES])
def test_greedy_tokens_match_transformers(family: str, qtype: Any, pre: str, add_bos: bool | None,
                                          tiny_hf: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "gguf"
    folder.mkdir()
    file = write_gguf(tiny_hf[family], folder / f"tiny-{family}.gguf", qtype=qtype, pre=pre, add_bos=add_bos)
    art = tmp_path / "art"
    export_model(gguf_to_model_dir(file, tmp_path / "hf"), art, ExportOptions(max_context=128))
    local = open_local(art)
    bos = local.manifest.bos_token_id
    for prompt in PROMPTS:
        hf_prompt, hf_tokens = _hf_greedy(folder, file.name, prompt, local.manifest.eos_token_ids[0])
        ours = local.tokenizer.encode(prompt).ids
        assert ours == hf_prompt, prompt
        assert (ours[0] == bos) == (add_bos is not False)  # SentencePiece: BOS unless the file says not
        result = generate_local(local.runtime, prompt_ids=ours, max_tokens=NEW_TOKENS,
                                eos_token_ids=local.manifest.eos_token_ids)
        assert list(result.tokens) == hf_tokens, prompt
        assert local.tokenizer.decode(ours, skip_special_tokens=True) == prompt


def test_model_dir_carries_chat_template_bos_and_limits(tiny_hf: dict[str, Path], tmp_path: Path) -> None:
    file = write_gguf(tiny_hf["qwen2"], tmp_path / "m.gguf", qtype=Q.F16, pre="qwen2", add_bos=False, eot=7)
    out = gguf_to_model_dir(file, tmp_path / "hf")
    manifest = export_model(out, tmp_path / "art", ExportOptions(max_context=64))
    assert manifest.eos_token_ids == (0, 7)  # EOT ends generation too, as in llama.cpp
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())
    assert (tok_cfg["chat_template"], tok_cfg["add_bos_token"], tok_cfg["eos_token"]) == (
        CHAT_TEMPLATE, False, "<|endoftext|>")
    assert (cfg["max_position_embeddings"], cfg["tie_word_embeddings"]) == (2048, True)
    assert find_gguf(tmp_path) == file  # a directory holding one .gguf names it


def test_cli_exports_a_gguf_file(tiny_hf: dict[str, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    file = write_gguf(tiny_hf["llama"], tmp_path / "tiny.gguf", qtype=Q.Q8_0, pre="llama-bpe", add_bos=True)
    assert main(["export", "--model", str(file), "--out", str(tmp_path / "art"), "--max-context", "64"]) == 0
    assert "reading GGUF: " in capsys.readouterr().err
    assert json.loads((tmp_path / "art" / "manifest.json").read_text())["name"] == "tiny"


def _export_error(file: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    assert main(["export", "--model", str(file), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_unknown_architecture_fails_with_one_line(tiny_hf: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    file = write_gguf(tiny_hf["llama"], tmp_path / "m.gguf", qtype=Q.F32, pre="default", add_bos=False,
                      arch="gptneox")
    err = _export_error(file, tmp_path / "art", capsys)
    assert "architecture 'gptneox'" in err and "supported: llama, qwen2, bloom" in err


def test_unknown_tensor_type_fails_with_one_line(tiny_hf: dict[str, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    file = write_gguf(tiny_hf["llama"], tmp_path / "m.gguf", qtype=Q.F64, pre="default", add_bos=False)
    err = _export_error(file, tmp_path / "art", capsys)
    assert "has GGUF type F64; supported: F32, F16, BF16, Q4_0" in err


def test_unknown_tokenizer_model_is_refused(tiny_hf: dict[str, Path], tmp_path: Path) -> None:
    file = write_gguf(tiny_hf["llama"], tmp_path / "m.gguf", qtype=Q.F32, pre="no-such-pre", add_bos=False)
    with pytest.raises(ModelsError, match="pre-tokenizer 'no-such-pre'"):
        gguf_to_model_dir(file, tmp_path / "hf")


def test_unsupported_tensors_fail_with_one_line(tiny_hf: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    rope = write_gguf(tiny_hf["llama"], tmp_path / "rope.gguf", qtype=Q.F32, pre="default", add_bos=False,
                      extra={"rope_freqs.weight": np.ones(8, dtype=np.float32)})
    assert "llama3 RoPE scaling (rope_freqs) is not supported" in _export_error(rope, tmp_path / "a1", capsys)
    odd = write_gguf(tiny_hf["qwen2"], tmp_path / "odd.gguf", qtype=Q.F32, pre="qwen2", add_bos=False,
                     extra={"blk.0.attn_q_norm.weight": np.ones(16, dtype=np.float32)})
    assert "GGUF tensor 'blk.0.attn_q_norm.weight' is not supported" in _export_error(odd, tmp_path / "a2", capsys)
