"""One valid example of every JSON message: documentation, test and fuzz seeds."""

from __future__ import annotations

from linguamq.schemas.blobs import BlobChunk, BlobRequest
from linguamq.schemas.cluster import (
    Assignment,
    BatchTiming,
    ClockPing,
    ClockPong,
    LeftOut,
    NodeControl,
    NodeStatus,
    PieceTiming,
    Plan,
    Profile,
    Segment,
    Stage,
    Telemetry,
)
from linguamq.schemas.manifest import ModelManifest, PieceKind, PieceSpec, TensorSpec
from linguamq.schemas.requests import CancelRequest, ErrorReport, GenerateRequest, GenerateResult, Sampling, TokenEvent
from linguamq.schemas.wire import Message

SHA = "0123456789abcdef" * 4


def _piece(index: int, kind: PieceKind, name: str) -> PieceSpec:
    hidden = TensorSpec(name="hidden", dtype="float32", shape=(1, "seq", 64))
    ids = TensorSpec(name="input_ids", dtype="int64", shape=(1, "seq"))
    logits = TensorSpec(name="logits", dtype="float32", shape=(1, 512))
    io = {"embed": ((ids,), (hidden,)), "layer": ((hidden,), (hidden,)), "head": ((hidden,), (logits,))}[kind]
    return PieceSpec(index=index, name=name, kind=kind, file=f"{name}.onnx", sha256=SHA, bytes=65_536,
                     params=16_384, flops_per_token=32_768, flops_per_prompt_token=32_768 if kind != "head" else 0,
                     attn_flops_per_position=256 if kind == "layer" else 0, act_bytes_per_token=256,
                     kv_bytes_per_token=256 if kind == "layer" else 0, inputs=io[0], outputs=io[1])


MANIFEST = ModelManifest(
    name="tiny-llama", family="llama", dtype="fp32", quantization="none", hidden_size=64, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=16, vocab_size=512, max_context=256, act_dtype="float32",
    tokenizer_file="tokenizer.json", tokenizer_sha256=SHA, eos_token_ids=(2,), bos_token_id=1,
    pieces=(_piece(0, "embed", "embed"), _piece(1, "layer", "layer.0"), _piece(2, "layer", "layer.1"),
            _piece(3, "head", "head")),
)

EXAMPLES: dict[type[Message], Message] = {m.__class__: m for m in (
    MANIFEST,
    NodeStatus(node="phone-1", state="ready", ts=1_700_000_000.5, version="0.1.0", platform="android-aarch64",
               threads=4, mem_budget_mb=2048.0, epoch=3),
    Telemetry(node="phone-1", ts=1_700_000_001.0, seq=17, epoch=3,
              profile=Profile(ms_per_gflop_decode=12.5, ms_per_gflop_prefill=4.0, mem_budget_mb=2048.0,
                              rtt_ms=3.2, uplink_mbps=80.0, downlink_mbps=120.0, batch_cost=(1.1, 1.3, 1.9)),
              pieces=(PieceTiming(piece=1, ms_ewma=2.5, runs=100),),
              batches=(BatchTiming(piece=1, rows=2, ms_ewma=2.8, runs=40),), queue_depth=1, sessions=2,
              kv_bytes=1 << 20, free_mem_mb=900.0, rss_mb=300.0, battery_pct=81.0, thermal_c=38.5),
    Assignment(node="phone-1", epoch=3, manifest_sha256=SHA,
               segments=(Segment(first=0, last=1, next_piece=2),), prefetch=(2,)),
    Plan(epoch=3, objective="latency",
         stages=(Stage(node="phone-1", first=0, last=1, predicted_ms=4.0),
                 Stage(node="laptop", first=2, last=3, predicted_ms=2.0, measured_ms=2.2)),
         predicted_ms_per_token=7.5, bottleneck="phone-1", reason="node joined: laptop",
         left_out=(LeftOut(node="pi", why="slower than the plan without it"),), solve_s=0.05),
    GenerateRequest(id="r1", prompt="Hello", max_tokens=16, sampling=Sampling(temperature=0.7, top_k=40, top_p=0.9,
                    seed=7), stop=("\n\n",), client="cli-1"),
    CancelRequest(id="r1", client="cli-1"),
    TokenEvent(request="r1", index=0, token=42, text=" world"),
    GenerateResult(request="r1", text=" world", tokens=(42,), prompt_tokens=5, ttft_ms=35.0, ms_per_token=12.5,
                   stop_reason="max_tokens", seed=7),
    ErrorReport(reporter="phone-1", topic="requests", code="bad_payload",
                message="max_tokens: 0 is below the minimum 1", ref="r1", ts=1_700_000_002.0),
    NodeControl(node="phone-1", slowdown=3.0),
    BlobRequest(node="phone-1", sha256=SHA, offset=0, length=1 << 20),
    BlobChunk(sha256=SHA, offset=0, total=4096, chunk_sha256=SHA),
    ClockPing(client="tracer-1", seq=3, t0=1_700_000_003.0),
    ClockPong(node="phone-1", seq=3, t0=1_700_000_003.0, t1=1_700_000_003.25, t2=1_700_000_003.2504),
)}
