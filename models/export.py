"""Export a Hugging Face causal LM to per-piece ONNX files plus `manifest.json`.

Pieces (names and tensors are the contract with `linguamq.node.runtime`):
  embed     input_ids (1, seq) int64                      -> hidden (1, seq, H)
  layer.{i} hidden (1, seq, H), position_ids (1, seq) int64,   (Bloom)
            past_key, past_value (1, kv_heads, past, D)    -> hidden_out (1, seq, H),
                                                              present_key, present_value (1, kv_heads, total, D)
            Llama and Qwen2, for ONNX Runtime's fused kernels (GroupQueryAttention, rotary inside):
            hidden (1, seq, H), past_key, past_value (1, kv_heads, capacity, D) buffers holding
            `past` positions, seqlens_k (1,) int32 = total - 1, total_sequence_length () int32,
            cos_cache, sin_cache (>= total, D/2) of manifest.rope_inv_freq
                                                           -> hidden_out, and the buffers with
                                                              past..total-1 written in place
  head      hidden (1, seq, H)                             -> logits (1, V) float32, last position only
`position_ids` are absolute; the cache holds positions 0..past-1, so total = past + seq.
Each piece is one self-contained .onnx file (no external data) so its sha256 names it.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal, TypeVar

import onnx
import structlog
import torch
from torch import nn

from linguamq.models.chat_template import export_chat_template
from linguamq.models.config import ModelConfig
from linguamq.models.costs import piece_costs
from linguamq.models.errors import ExportError
from linguamq.models.hf import CausalLM, ModelDir, load_model, open_model_dir
from linguamq.models.llama import InPlaceLayer, LlamaForCausalLM, rope_inv_freq
from linguamq.schemas.manifest import Dtype, ModelManifest, PieceKind, PieceSpec, TensorSpec, file_sha256

MANIFEST = "manifest.json"
OPSET = 17
TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
ONNX_DTYPES: dict[int, Dtype] = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                                 onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32"}
INT4_BLOCK = 32  # weights per scale along K, as in llama.cpp's Q4_0/Q4_1
MAX_PIECE_BYTES = 2**31 - 1  # protobuf limit of one self-contained .onnx file
# (input names, output names, dynamic axes) per piece kind.
IO: dict[str, tuple[tuple[str, ...], tuple[str, ...], dict[str, dict[int, str]]]] = {
    "embed": (("input_ids",), ("hidden",), {"input_ids": {0: "batch", 1: "seq"}, "hidden": {0: "batch", 1: "seq"}}),
    "layer": (("hidden", "position_ids", "past_key", "past_value"), ("hidden_out", "present_key", "present_value"),
              {"hidden": {1: "seq"}, "position_ids": {1: "seq"}, "past_key": {2: "past"},
               "past_value": {2: "past"}, "hidden_out": {1: "seq"}, "present_key": {2: "total"},
               "present_value": {2: "total"}}),
    "head": (("hidden",), ("logits",), {"hidden": {0: "batch", 1: "seq"}, "logits": {0: "batch"}}),
    # Rotary families: the cache is a buffer of `capacity` positions that the layer writes in place.
    "layer_in_place": (
        ("hidden", "past_key", "past_value", "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"),
        ("hidden_out", "present_key", "present_value"),
        {"hidden": {0: "batch", 1: "seq"}, "past_key": {0: "batch", 2: "capacity"},
         "past_value": {0: "batch", 2: "capacity"}, "seqlens_k": {0: "batch"}, "hidden_out": {0: "batch", 1: "seq"},
         "present_key": {0: "batch", 2: "capacity"}, "present_value": {0: "batch", 2: "capacity"},
         "cos_cache": {0: "positions"}, "sin_cache": {0: "positions"}}),
}

# Called before each piece: (index, total, piece name).
Progress = Callable[[int, int, str], None]
M = TypeVar("M", bound=nn.Module)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ExportOptions:
    dtype: Literal["fp32", "fp16"] = "fp32"
    quantize: Literal["none", "int8", "int4"] = "none"
    max_context: int | None = None  # default: the model's max_position_embeddings
    name: str | None = None  # default: the model directory's name


def export_model(model_path: Path | str, out_dir: Path | str, options: ExportOptions = ExportOptions(),
                 progress: Progress | None = None) -> ModelManifest:
    """Write one .onnx per piece, the tokenizer (and chat template) and manifest.json into `out_dir`."""
    if options.quantize != "none" and options.dtype != "fp32":
        raise ExportError(f"--quantize {options.quantize} needs --dtype fp32 (weights are quantized from float32)")
    if options.quantize == "int4":
        _nbits_quantizer()  # missing dependencies: refused before the model is read
    model_dir = open_model_dir(model_path)
    cfg = model_dir.config
    max_context = _max_context(cfg, options.max_context)
    model = _cast_parameters(load_model(model_dir), TORCH_DTYPES[options.dtype])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pieces = tuple(_export_all(model, cfg, out, options, progress))
    tokenizer = out / "tokenizer.json"
    shutil.copyfile(model_dir.tokenizer_file, tokenizer)
    manifest = dataclasses.replace(_manifest(model_dir, options, max_context, pieces, tokenizer),
                                   chat_template=export_chat_template(model_dir.path, out))
    (out / MANIFEST).write_bytes(manifest.to_json())
    return manifest


def read_manifest(artifact_dir: Path | str) -> ModelManifest:
    return ModelManifest.from_json((Path(artifact_dir) / MANIFEST).read_bytes())


def _max_context(cfg: ModelConfig, requested: int | None) -> int:
    limit = cfg.max_position_embeddings
    if cfg.sliding_window is not None and cfg.sliding_window < limit:
        if requested is not None and requested > cfg.sliding_window:
            raise ExportError(f"--max-context {requested} exceeds the sliding window {cfg.sliding_window}; "
                              "sliding-window attention is not supported")
        limit = cfg.sliding_window
    if requested is not None and requested > limit:
        raise ExportError(f"--max-context {requested} exceeds the model's limit of {limit} positions")
    if requested is not None and requested < 1:
        raise ExportError(f"--max-context must be positive, got {requested}")
    return requested or limit


def _cast_parameters(model: M, dtype: torch.dtype) -> M:
    """Weights to `dtype`; buffers (RoPE frequencies, ALiBi slopes) stay float32."""
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(dtype)
    return model


def _pieces(model: CausalLM, cfg: ModelConfig) -> Iterator[tuple[PieceKind, str, nn.Module]]:
    yield "embed", "embed", model.embed_piece()
    for i in range(cfg.num_layers):
        yield "layer", f"layer.{i}", (model.in_place_layer_piece(i) if isinstance(model, LlamaForCausalLM)
                                      and _in_place(cfg) else model.layer_piece(i))
    yield "head", "head", model.head_piece()


def _in_place(cfg: ModelConfig) -> bool:
    """Layers of rotary families (Llama, Qwen2) go to GroupQueryAttention when its rotary
    takes their head size (a multiple of 16); Bloom's ALiBi has no place in it. The others
    concatenate their cache."""
    return cfg.head_dim % 16 == 0


def _export_all(model: CausalLM, cfg: ModelConfig, out: Path, options: ExportOptions,
                progress: Progress | None) -> Iterator[PieceSpec]:
    total = cfg.num_layers + 2
    log = structlog.get_logger()
    for index, (kind, name, module) in enumerate(_pieces(model, cfg)):
        if progress is not None:
            progress(index, total, name)
        started = time.perf_counter()
        path = out / f"{name}.onnx"
        _export_piece(module, kind, cfg, path, options)
        spec = _piece_spec(index, kind, name, module, cfg, path, options)
        log.debug("exported piece", piece=name, bytes=spec.bytes, seconds=round(time.perf_counter() - started, 2))
        yield spec


def _export_piece(module: nn.Module, kind: str, cfg: ModelConfig, path: Path, options: ExportOptions) -> None:
    target = path.with_suffix(".fp32.onnx") if options.quantize != "none" else path
    inputs, outputs, axes = IO["layer_in_place" if isinstance(module, InPlaceLayer) else kind]
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is deprecated (and says so); it is the one that gives
        # one self-contained file with plain dynamic axes. TracerWarnings are expected.
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, _dummy_inputs(kind, cfg, module), str(target), dynamo=False,
                              input_names=list(inputs), output_names=list(outputs), dynamic_axes=axes,
                              opset_version=OPSET, do_constant_folding=True,
                              custom_opsets={"com.microsoft": 1} if isinstance(module, InPlaceLayer) else None)
        except (RuntimeError, ValueError, onnx.checker.ValidationError) as exc:
            raise ExportError(f"ONNX export of {path.stem} failed: {str(exc).splitlines()[0]}") from exc
    if options.quantize == "int8":
        _quantize(target, path)
    elif options.quantize == "int4":
        _quantize_int4(target, path, kind)
    if path.stat().st_size > MAX_PIECE_BYTES:
        raise ExportError(f"{path.name} is {path.stat().st_size} bytes, over the 2 GiB limit of one ONNX file; "
                          "export with --dtype fp16 or --quantize int8")


def _dummy_inputs(kind: str, cfg: ModelConfig, module: nn.Module) -> tuple[torch.Tensor, ...]:
    # Distinct sizes (batch 2, seq 5, past 3) so that no dynamic dim is traced as a constant.
    dtype = next(module.parameters()).dtype
    hidden = torch.zeros(2, 5, cfg.hidden_size, dtype=dtype)
    if kind == "embed":
        return (torch.arange(10).view(2, 5) % cfg.vocab_size,)
    if kind == "head":
        return (hidden,)
    if isinstance(module, InPlaceLayer):  # 3 cached + 5 new positions in a buffer of 16, rotary for 32
        buffer = torch.zeros(2, cfg.num_kv_heads, 16, cfg.head_dim, dtype=dtype)
        angles = torch.arange(32)[:, None].float() * rope_inv_freq(cfg)  # (32, D/2)
        return (hidden, buffer, buffer.clone(), torch.tensor([7, 7], dtype=torch.int32),
                torch.tensor(8, dtype=torch.int32), angles.cos().to(dtype), angles.sin().to(dtype))
    hidden = hidden[:1]  # a concatenated cache runs one session per call
    past = torch.zeros(1, cfg.num_kv_heads, 3, cfg.head_dim, dtype=dtype)
    return hidden, torch.arange(3, 8)[None], past, past.clone()


def _quantize(source: Path, target: Path) -> None:
    """Dynamic int8 (per-channel weights, activations quantized at run time), after ORT's
    recommended pre-processing (shape inference + graph optimisation)."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic  # export extra only

    prepared = source.with_suffix(".prep.onnx")
    try:
        quant_pre_process(str(source), str(prepared))
        quantize_dynamic(str(prepared), str(target), weight_type=QuantType.QInt8, per_channel=True)
    finally:
        source.unlink(missing_ok=True)
        prepared.unlink(missing_ok=True)


def _quantize_int4(source: Path, target: Path, kind: str) -> None:
    """A layer's MatMuls with a constant weight -> ONNX Runtime's block-wise `MatMulNBits`
    (INT4_BLOCK values along K, a zero point per block: asymmetric rounds closer), accuracy
    level 4 so that the CPU computes in int8, quantizing activations per row and block. The
    head (vocab x hidden) gets 8 bits the same way: 4 bits there cost agreement for half a
    millisecond per token, and `--quantize int8`'s dynamic quantization scales a batch's
    activations together, so a session's logits would depend on the others in its batch.
    The embedding (a lookup, no activation quantized) is quantized as `--quantize int8`
    does it. llama.cpp's Q4 files keep embedding and head 8-bit too."""
    if kind == "embed":
        _quantize(source, target)
        return
    try:
        bits = 4 if kind == "layer" else 8
        quantizer = _nbits_quantizer()(onnx.load(str(source)), bits=bits, block_size=INT4_BLOCK, is_symmetric=False,
                                       accuracy_level=4, op_types_to_quantize=("MatMul",))
        quantizer.process()
        onnx.save(quantizer.model.model, str(target))
    finally:
        source.unlink(missing_ok=True)


def _nbits_quantizer() -> Any:
    """ONNX Runtime's MatMulNBitsQuantizer class. Importing it configures the root logger
    (basicConfig at INFO): the root logger's handlers and level are put back."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer  # export extra only
    except ImportError as exc:  # it needs onnx-ir, which onnxruntime does not require
        raise ExportError(f"--quantize int4 needs ONNX Runtime's 4-bit quantizer, which cannot be imported "
                          f"({exc}); pip install onnx-ir") from exc
    finally:
        root.handlers[:], root.level = handlers, level
    logging.getLogger(MatMulNBitsQuantizer.__module__).setLevel(logging.WARNING)  # one INFO line per MatMul
    return MatMulNBitsQuantizer


def _piece_spec(index: int, kind: PieceKind, name: str, module: nn.Module, cfg: ModelConfig, path: Path,
                options: ExportOptions) -> PieceSpec:
    graph = onnx.load(str(path), load_external_data=False).graph
    costs = piece_costs(kind, module, cfg, act_itemsize=2 if options.dtype == "fp16" else 4)
    return PieceSpec(index=index, name=name, kind=kind, file=path.name, sha256=file_sha256(path),
                     bytes=path.stat().st_size, inputs=_tensor_specs(graph.input),
                     outputs=_tensor_specs(graph.output), **dataclasses.asdict(costs))


def _tensor_specs(values: Iterable[Any]) -> tuple[TensorSpec, ...]:  # onnx ValueInfoProtos
    return tuple(TensorSpec(name=v.name, dtype=ONNX_DTYPES[v.type.tensor_type.elem_type],
                            shape=tuple(d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim))
                 for v in values)


def _manifest(model_dir: ModelDir, options: ExportOptions, max_context: int, pieces: tuple[PieceSpec, ...],
              tokenizer: Path) -> ModelManifest:
    cfg = model_dir.config
    return ModelManifest(
        name=options.name or model_dir.name, family=cfg.family, dtype=options.dtype,
        quantization=options.quantize, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads, head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size, max_context=max_context,
        act_dtype="float16" if options.dtype == "fp16" else "float32",
        tokenizer_file=tokenizer.name, tokenizer_sha256=file_sha256(tokenizer),
        eos_token_ids=model_dir.eos_token_ids, bos_token_id=model_dir.bos_token_id, pieces=pieces,
        rope_inv_freq=tuple(rope_inv_freq(cfg).tolist()) if any(p.inputs[-1].name == "sin_cache" for p in pieces) else (),
        batch_rows=_batch_rows(pieces, options),
    )


def _batch_rows(pieces: tuple[PieceSpec, ...], options: ExportOptions) -> bool:
    """Pieces that take a batch of sessions and compute each row as alone: in-place layers
    (a concatenated cache is one session's), and no activation quantized per tensor
    (`--quantize int8`'s dynamic quantization scales a whole batch by its largest value)."""
    layers = [p for p in pieces if p.kind == "layer"]
    return all(p.inputs[-1].name == "sin_cache" for p in layers) and options.quantize != "int8"
