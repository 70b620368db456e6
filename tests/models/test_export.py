"""Export: the manifest's pieces, sizes and costs against a hand count."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from linguamq.models.errors import ExportError
from linguamq.models.export import ExportOptions, export_model, read_manifest
from linguamq.models.tiny import TinySpec, make_tiny
from linguamq.node.runtime import SegmentRuntime
from linguamq.schemas.manifest import ModelManifest

H, HEADS, D, V = 64, 4, 16, 512  # the tiny_dirs fixture: hidden 64, 4 heads, vocab 512


@pytest.fixture(scope="module")
def exported(tiny_dirs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, ModelManifest]]:
    out = {}
    for family in ("llama", "bloom"):
        art = tmp_path_factory.mktemp(f"art-{family}")
        out[family] = (art, export_model(tiny_dirs[family], art, ExportOptions(max_context=256)))
    art = tmp_path_factory.mktemp("art-llama-int4")
    out["llama-int4"] = (art, export_model(tiny_dirs["llama"], art, ExportOptions(max_context=256, quantize="int4")))
    return out


def test_llama_manifest_matches_a_hand_count(exported: dict[str, tuple[Path, ModelManifest]]) -> None:
    _, m = exported["llama"]
    kv, inter = 2, 192  # kv heads default to heads / 2; intermediate = 8/3 * 64 rounded up to 32
    linear = H * HEADS * D + 2 * H * kv * D + HEADS * D * H + 3 * H * inter  # q, k, v, o, gate/up/down
    assert [(p.index, p.name, p.kind) for p in m.pieces] == [
        (0, "embed", "embed"), (1, "layer.0", "layer"), (2, "layer.1", "layer"), (3, "head", "head")]
    embed, layer, head = m.pieces[0], m.pieces[1], m.pieces[3]
    assert (embed.params, embed.flops_per_token, embed.flops_per_prompt_token) == (V * H, 0, 0)
    assert (layer.params, layer.flops_per_token, layer.flops_per_prompt_token) == (linear + 2 * H, 2 * linear, 2 * linear)
    assert (head.params, head.flops_per_token, head.flops_per_prompt_token) == (H + H * V, 2 * H * V, 0)
    assert layer.attn_flops_per_position == 2 * HEADS * D + 2 * HEADS * D
    assert [p.kv_bytes_per_token for p in m.pieces] == [0, 2 * kv * D * 4, 2 * kv * D * 4, 0]
    assert [p.act_bytes_per_token for p in m.pieces] == [H * 4, H * 4, H * 4, V * 4]
    assert (m.family, m.num_kv_heads, m.head_dim, m.max_context, m.act_dtype) == ("llama", kv, D, 256, "float32")


def test_bloom_manifest_matches_a_hand_count(exported: dict[str, tuple[Path, ModelManifest]]) -> None:
    _, m = exported["bloom"]
    linear = H * 3 * H + H * H + 2 * H * 4 * H  # query_key_value, dense, h_to_4h, 4h_to_h
    biases, norms = 3 * H + H + 4 * H + H, 2 * 2 * H
    embed, layer, head = m.pieces[0], m.pieces[1], m.pieces[-1]
    assert (embed.params, embed.flops_per_token) == (V * H + 2 * H, 0)  # + word_embeddings_layernorm
    assert (layer.params, layer.flops_per_token) == (linear + biases + norms, 2 * linear)
    assert (head.params, head.flops_per_token) == (2 * H + H * V, 2 * H * V)  # tied: the head holds a copy
    assert layer.kv_bytes_per_token == 2 * HEADS * D * 4


@pytest.mark.parametrize("family", ["llama", "bloom"])
def test_files_sizes_hashes_and_tensors(family: str, exported: dict[str, tuple[Path, ModelManifest]]) -> None:
    art, m = exported[family]
    assert read_manifest(art) == m
    assert hashlib.sha256((art / m.tokenizer_file).read_bytes()).hexdigest() == m.tokenizer_sha256
    for p in m.pieces:
        data = (art / p.file).read_bytes()
        assert (len(data), hashlib.sha256(data).hexdigest()) == (p.bytes, p.sha256)
        graph = onnx.load(str(art / p.file)).graph
        assert [t.name for t in p.inputs] == [i.name for i in graph.input]
        assert not any(init.data_location == onnx.TensorProto.EXTERNAL for init in graph.initializer)
    layer = {t.name: t for t in m.pieces[1].inputs + m.pieces[1].outputs}
    kv = m.num_kv_heads
    # Embedding and head take a batch of sessions, one row each.
    assert [t.shape for t in m.pieces[0].inputs] == [("batch", "seq")]
    assert [t.shape for t in m.pieces[-1].inputs] == [("batch", "seq", H)]
    if family == "bloom":  # ALiBi: the cache grows by concatenation, one session per call
        assert layer["hidden"].shape == (1, "seq", H)
        assert layer["position_ids"].shape == (1, "seq") and layer["position_ids"].dtype == "int64"
        assert layer["past_key"].shape == (1, kv, "past", D)
        assert layer["present_value"].shape == (1, kv, "total", D)
        assert m.rope_inv_freq == () and not m.batch_rows
    else:  # a buffer written in place by ONNX Runtime's GroupQueryAttention, rotary inside it; rows of a batch
        assert layer["hidden"].shape == ("batch", "seq", H) and m.batch_rows
        assert layer["past_key"].shape == layer["present_key"].shape == ("batch", kv, "capacity", D)
        assert layer["seqlens_k"].shape == ("batch",)
        assert layer["seqlens_k"].dtype == layer["total_sequence_length"].dtype == "int32"
        assert layer["cos_cache"].shape == ("positions", D // 2)
        assert len(m.rope_inv_freq) == D // 2
        ops = {node.op_type for node in onnx.load(str(art / m.pieces[1].file)).graph.node}
        assert "GroupQueryAttention" in ops and not ops & {"Sin", "Cos", "Softmax"}
    assert {t.name: t.shape for t in m.pieces[-1].outputs} == {"logits": ("batch", V)}


def test_int4_layers_are_4_bit_blocks_that_a_node_runs(exported: dict[str, tuple[Path, ModelManifest]]) -> None:
    (art, m), (_, fp32) = exported["llama-int4"], exported["llama"]
    assert read_manifest(art) == m and (m.quantization, m.dtype, m.act_dtype) == ("int4", "fp32", "float32")
    for piece, full in zip(m.pieces, fp32.pieces):
        assert (piece.name, piece.inputs, piece.outputs, piece.params) == (full.name, full.inputs, full.outputs,
                                                                           full.params)
        graph = onnx.load(str(art / piece.file)).graph
        nbits = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
                 for n in graph.node if n.op_type == "MatMulNBits"]
        if piece.kind == "layer":  # qkv, o, gate+up, down: 4 bits in blocks of 32, int8 compute
            assert [(a["bits"], a["block_size"], a["accuracy_level"]) for a in nbits] == [(4, 32, 4)] * 4
            assert piece.bytes < full.bytes / 3
        elif piece.kind == "head":  # 8 bits in blocks of 32, activations quantized per row: a batch's rows exact
            assert [(a["bits"], a["block_size"], a["accuracy_level"], a["K"], a["N"]) for a in nbits] == \
                [(8, 32, 4, H, V)]
        else:  # the embedding (a lookup) stays 8-bit, as --quantize int8 has it
            matrices = [sorted(i.dims) for i in graph.initializer if len(i.dims) == 2]
            eight_bit = [i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) for i in graph.initializer
                         if len(i.dims) == 2]
            assert not nbits and (matrices, eight_bit) == ([[H, V]], [True])
    assert sum(p.bytes for p in m.pieces) < sum(p.bytes for p in fp32.pieces) / 2
    # A node's runtime loads a 4-bit layer on its own and runs it against its cache.
    layer = SegmentRuntime(manifest=m, artifact_dir=art, first=1, last=1)
    hidden = layer.run("s", np.ones((1, 3, H), np.float32), np.arange(3)[None])
    hidden = layer.run("s", hidden[:, -1:], np.array([[3]]))
    assert hidden.shape == (1, 1, H) and np.isfinite(hidden).all() and layer.context_length("s") == 4


def test_int4_without_the_quantizer_is_refused_before_anything_is_written(
        tiny_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization.matmul_nbits_quantizer", None)  # import fails
    with pytest.raises(ExportError, match="--quantize int4 needs ONNX Runtime's 4-bit quantizer.*pip install onnx-ir"):
        export_model(tiny_dirs["llama"], tmp_path / "art", ExportOptions(quantize="int4"))
    assert not (tmp_path / "art").exists()


def test_export_refuses_bad_options(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="max-context"):
        export_model(tiny_dirs["llama"], tmp_path, ExportOptions(max_context=10**6))
    with pytest.raises(ExportError, match="int8"):
        export_model(tiny_dirs["llama"], tmp_path, ExportOptions(dtype="fp16", quantize="int8"))
    with pytest.raises(ExportError, match="--quantize int4 needs --dtype fp32"):
        export_model(tiny_dirs["llama"], tmp_path, ExportOptions(dtype="fp16", quantize="int4"))


def test_a_head_size_grouped_query_attention_cannot_rotate_exports_a_concatenating_layer(tmp_path: Path) -> None:
    make_tiny(TinySpec(family="llama", layers=1, hidden=64, heads=8, kv_heads=4, vocab=300), tmp_path / "hf")  # D 8
    m = export_model(tmp_path / "hf", tmp_path / "art")
    assert [t.name for t in m.pieces[1].inputs] == ["hidden", "position_ids", "past_key", "past_value"]
    assert m.rope_inv_freq == ()
    rt = SegmentRuntime(manifest=m, artifact_dir=tmp_path / "art", first=0, last=len(m.pieces) - 1)
    rt.run("s", np.array([[5, 6, 7]]), np.arange(3)[None])
    assert rt.run("s", np.array([[8]]), np.array([[3]])).shape == (1, 300)


def test_an_int8_export_says_its_batch_rows_are_not_independent(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """Dynamic int8 quantizes a MatMul's whole input with one scale: a row's result depends
    on the other rows of its batch. The manifest says so, and nodes run its sessions one a call."""
    m = export_model(tiny_dirs["llama"], tmp_path / "art", ExportOptions(quantize="int8"))
    assert not m.batch_rows
    import onnxruntime as ort
    head = ort.InferenceSession(str(tmp_path / "art" / m.pieces[-1].file))
    scales = np.array([1, 40], np.float32)[:, None, None]
    rows = np.random.default_rng(0).standard_normal((2, 1, H)).astype(np.float32) * scales
    batch = head.run(None, {"hidden": rows})[0]
    alone = head.run(None, {"hidden": rows[:1]})[0]
    assert not np.array_equal(batch[0], alone[0])  # the second row changed the first row's logits
