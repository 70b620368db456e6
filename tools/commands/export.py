"""`linguamq export --model HFDIR --out ARTDIR`: per-piece ONNX files + manifest.json."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from linguamq.models.errors import ModelsError
from linguamq.models.export import ExportOptions, export_model
from linguamq.models.tiny import TinySpec, make_tiny
from linguamq.schemas.errors import SchemaError

TINY = {"tiny-llama": "llama", "tiny-qwen2": "qwen2", "tiny-bloom": "bloom"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="HFDIR",
                        help=f"model directory, or one of {', '.join(TINY)} (made on the fly)")
    parser.add_argument("--out", required=True, metavar="ARTDIR", help="artifact directory to write")
    parser.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32", help="weights and activations")
    parser.add_argument("--quantize", choices=("none", "int8"), default="none",
                        help="int8: dynamic quantization of the weights (with --dtype fp32)")
    parser.add_argument("--max-context", type=int, default=None, metavar="N",
                        help="longest session in tokens (default: the model's max_position_embeddings)")
    parser.add_argument("--name", default=None, help="model name in the manifest (default: directory name)")


def run(args: argparse.Namespace) -> int:
    options = ExportOptions(dtype=args.dtype, quantize=args.quantize, max_context=args.max_context,
                            name=args.name or (args.model if args.model in TINY else None))
    try:
        with tempfile.TemporaryDirectory(prefix="linguamq-tiny-") as tmp:
            model = _model_dir(args.model, Path(tmp))
            started = time.perf_counter()
            manifest = export_model(model, args.out, options, progress=_Progress(started))
    except (ModelsError, SchemaError, OSError) as exc:
        print(f"linguamq export: error: {exc}", file=sys.stderr)
        return 2
    total = sum(p.bytes for p in manifest.pieces)
    print(f"exported {manifest.name}: {len(manifest.pieces)} pieces, {total / 1e6:.1f} MB, "
          f"{manifest.dtype}/{manifest.quantization} in {time.perf_counter() - started:.1f} s to {args.out}",
          file=sys.stderr)
    return 0


def _model_dir(model: str, tmp: Path) -> Path:
    if model in TINY:
        make_tiny(TinySpec(family=TINY[model]), tmp / model)
        return tmp / model
    return Path(model)


class _Progress:
    """One stderr line per piece: [3/14] layer.1 (elapsed)."""

    def __init__(self, started: float) -> None:
        self._started = started

    def __call__(self, index: int, total: int, name: str) -> None:
        elapsed = time.perf_counter() - self._started
        print(f"[{index + 1}/{total}] {name} ({elapsed:.1f} s)", file=sys.stderr, flush=True)
