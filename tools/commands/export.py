"""`linguamq export --model HFDIR|FILE.gguf --out ARTDIR`: per-piece ONNX files + manifest.json."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from linguamq.models.errors import ModelsError
from linguamq.models.export import ExportOptions, export_model
from linguamq.models.gguf import NAMED, find_gguf, gguf_to_model_dir, named_gguf
from linguamq.models.tiny import TinySpec, make_tiny
from linguamq.schemas.errors import SchemaError

TINY = {"tiny-llama": "llama", "tiny-qwen2": "qwen2", "tiny-bloom": "bloom"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="HFDIR",
                        help=f"model directory, a .gguf file (or a directory holding one), a model a package "
                             f"ships ({', '.join(NAMED)}), or one of {', '.join(TINY)} (made on the fly)")
    parser.add_argument("--out", required=True, metavar="ARTDIR", help="artifact directory to write")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="weights and activations")
    parser.add_argument("--quantize", choices=("none", "int8", "int4"), default="none",
                        help="int8: dynamic quantization of the weights; int4: 4-bit blocks of 32 "
                             "(MatMulNBits) in the layers, int8 embedding and head (both with --dtype fp32)")
    parser.add_argument("--max-context", type=int, default=None, metavar="N",
                        help="longest session in tokens (default: the model's max_position_embeddings)")
    parser.add_argument("--name", default=None, help="model name in the manifest (default: directory name)")


def run(args: argparse.Namespace) -> int:
    options = ExportOptions(dtype=args.dtype, quantize=args.quantize, max_context=args.max_context,
                            name=args.name or (args.model if args.model in TINY else None))
    try:
        with tempfile.TemporaryDirectory(prefix="linguamq-export-") as tmp:
            started = time.perf_counter()
            model = _model_dir(args.model, Path(tmp), started)
            manifest = export_model(model, args.out, options, progress=_Progress(started))
    except (ModelsError, SchemaError, OSError) as exc:
        print(f"linguamq export: error: {exc}", file=sys.stderr)
        return 2
    total = sum(p.bytes for p in manifest.pieces)
    print(f"exported {manifest.name}: {len(manifest.pieces)} pieces, {total / 1e6:.1f} MB, "
          f"{manifest.dtype}/{manifest.quantization} in {time.perf_counter() - started:.1f} s to {args.out}",
          file=sys.stderr)
    return 0


def _model_dir(model: str, tmp: Path, started: float) -> Path:
    if model in TINY:
        make_tiny(TinySpec(family=TINY[model]), tmp / model)
        return tmp / model
    gguf = named_gguf(model) or find_gguf(model)
    if gguf is None:
        return Path(model)
    # Named after the file, so that the manifest's default name is the GGUF's stem.
    return gguf_to_model_dir(gguf, tmp / gguf.stem, progress=_ReadProgress(started))


class _ReadProgress:
    """A stderr line per tenth of the GGUF's tensors read (dequantizing a big file takes a while)."""

    def __init__(self, started: float) -> None:
        self._started = started

    def __call__(self, done: int, total: int, name: str) -> None:
        if done == total or done * 10 // total != (done - 1) * 10 // total:
            elapsed = time.perf_counter() - self._started
            print(f"reading GGUF: {done}/{total} tensors ({elapsed:.1f} s)", file=sys.stderr, flush=True)


class _Progress:
    """One stderr line per piece: [3/14] layer.1 (elapsed)."""

    def __init__(self, started: float) -> None:
        self._started = started

    def __call__(self, index: int, total: int, name: str) -> None:
        elapsed = time.perf_counter() - self._started
        print(f"[{index + 1}/{total}] {name} ({elapsed:.1f} s)", file=sys.stderr, flush=True)
