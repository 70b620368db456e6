"""`linguamq bench pipeline`: decode ms/token of N local node processes vs run-local.

Same model, same thread count per process, alternating repetitions so noise on this
shared machine hits both sides alike; medians and their ratio. The model (a ~100M
llama made by `linguamq tiny`) is built once into --workdir and reused.

``--broker mosquitto`` runs the cluster on a mosquitto the bench starts (with
``set_tcp_nodelay``, tools/testing/mosquitto.py) instead of the hub's embedded broker.
``--trace FILE.jsonl`` records a trace (`linguamq trace`) during the distributed runs;
``--compare-trace`` measures what recording costs instead: distributed runs with and
without a recording tracer, alternating, medians and their ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from linguamq.client import generate_remote, new_request_id
from linguamq.node.runtime import RuntimeSettings
from linguamq.schemas.cluster import Plan
from linguamq.schemas.manifest import ModelManifest
from linguamq.schemas.requests import GenerateRequest
from linguamq.tools.local import generate_local, open_local
from linguamq.tools.testing.cluster import LocalCluster, NodeSpec
from linguamq.tools.testing.mosquitto import mosquitto
from linguamq.tools.trace.tracer import record_during
from linguamq.topics.client import MqttClient

PROMPT = "The distributed pipeline carries activations between small devices over MQTT topics. "


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="ORT threads per node and for run-local (default 1)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-ring", dest="ring", action="store_false",
                        help="the hub sends every step itself (hub --no-ring), to compare with the ring")
    parser.add_argument("--broker", choices=("embedded", "mosquitto"), default="embedded",
                        help="the hub's embedded broker (default), or a mosquitto the bench starts (`make setup`)")
    parser.add_argument("--trace", type=Path, help="record a trace of the distributed runs to this JSONL file")
    parser.add_argument("--compare-trace", action="store_true",
                        help="distributed runs with vs without a recording tracer, alternating (no run-local)")


def run(args: argparse.Namespace) -> int:
    art = model_from_args(args)
    report = compare_trace(args, art) if args.compare_trace else measure(args, art)
    print(json.dumps(report, indent=2) if args.json else (trace_table if args.compare_trace else table)(report))
    return 0


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--workdir and the dimensions of the bench model (default: the ~100M llama)."""
    parser.add_argument("--workdir", type=Path, default=Path("out/bench"), help="model cache and logs")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)


def model_from_args(args: argparse.Namespace) -> Path:
    return bench_model(args.workdir, layers=args.layers, hidden=args.hidden, heads=args.heads, vocab=args.vocab)


def bench_model(workdir: Path, *, layers: int, hidden: int, heads: int, vocab: int) -> Path:
    """Artifacts of a tiny llama of these dimensions, built once under ``workdir``."""
    root = workdir / f"llama-L{layers}-H{hidden}-A{heads}-V{vocab}"
    manifest = root / "art" / "manifest.json"
    if not manifest.exists() or not ModelManifest.from_json(manifest.read_bytes()).batch_rows:  # none, or pre-batching
        from linguamq.models.export import ExportOptions, export_model  # torch: only when building
        from linguamq.models.tiny import TinySpec, make_tiny
        print(f"building the model in {root} (once) ...", file=sys.stderr, flush=True)
        make_tiny(TinySpec(family="llama", layers=layers, hidden=hidden, heads=heads, vocab=vocab), root / "hf")
        export_model(root / "hf", root / "art", ExportOptions(max_context=1024))
    return root / "art"


@contextlib.contextmanager
def even_cluster(args: argparse.Namespace, art: Path) -> Iterator[tuple[LocalCluster, MqttClient, Plan]]:
    """``--nodes`` node processes on the even split, ready: the bench measures what
    distribution costs, so every node takes part."""
    nodes = [NodeSpec(f"n{i + 1}", threads=args.threads) for i in range(args.nodes)]
    with contextlib.ExitStack() as stack:
        url = None
        if args.broker == "mosquitto":
            root = args.workdir / "mosquitto"
            root.mkdir(parents=True, exist_ok=True)
            port = stack.enter_context(mosquitto(root=root))
            url = f"mqtt://127.0.0.1:{port}"
        cluster = stack.enter_context(LocalCluster(
            artifacts=art, nodes=nodes, workdir=args.workdir / "pipeline-run", cluster="bench", objective="even",
            hub_args=() if args.ring else ("--no-ring",), broker_url=url))
        client = stack.enter_context(MqttClient(url=cluster.url, client_id="bench-pipeline"))
        yield cluster, client, cluster.wait_ready(client, nodes=args.nodes, timeout=180)


def measure(args: argparse.Namespace, art: Path) -> dict[str, Any]:
    local = open_local(art, RuntimeSettings(intra_op_threads=args.threads, allow_spinning=False))
    prompt_ids = local.tokenizer.encode(PROMPT).ids
    rows: dict[str, list[tuple[float, float]]] = {"local": [], "distributed": []}
    with even_cluster(args, art) as (cluster, client, plan), contextlib.ExitStack() as tracing:
        if args.trace:
            tracing.enter_context(record_during(cluster.url, cluster.cluster, args.trace))
        for rep in range(args.reps + 1):  # rep 0 warms both sides up
            res = generate_local(local.runtime, prompt_ids=prompt_ids, max_tokens=args.new_tokens)
            remote = generate_remote(client, cluster.cluster, GenerateRequest(
                id=new_request_id(), prompt=PROMPT, max_tokens=args.new_tokens), timeout=300)
            if remote.tokens != res.tokens:
                raise RuntimeError("distributed output differs from run-local")
            if rep:
                rows["local"].append((res.ttft_ms, res.ms_per_token))
                rows["distributed"].append((remote.ttft_ms, remote.ms_per_token))
            print(f"rep {rep}: local {res.ms_per_token:.2f} ms/token, distributed {remote.ms_per_token:.2f}",
                  file=sys.stderr, flush=True)
    med = {k: {"ttft_ms": statistics.median(r[0] for r in v), "ms_per_token": statistics.median(r[1] for r in v)}
           for k, v in rows.items()}
    return {"model": art.parent.name, "params": sum(p.params for p in local.manifest.pieces),
            "nodes": args.nodes, "threads": args.threads, "new_tokens": args.new_tokens,
            "prompt_tokens": len(prompt_ids), "reps": args.reps, "ring": args.ring, "broker": args.broker,
            "stages": [f"{s.node}:{s.first}-{s.last}" for s in plan.stages], **med,
            "ratio_distributed_over_local": med["distributed"]["ms_per_token"] / med["local"]["ms_per_token"],
            "target_ratio": 1.20}


def table(r: dict[str, Any]) -> str:
    return "\n".join([
        f"model {r['model']} ({r['params'] / 1e6:.0f}M params), {r['nodes']} nodes x {r['threads']} thread(s), "
        f"{r['prompt_tokens']} prompt + {r['new_tokens']} new tokens, median of {r['reps']}, "
        f"ring {'on' if r['ring'] else 'off (hub --no-ring)'}, broker {r['broker']}",
        f"  stages: {' '.join(r['stages'])}",
        f"  run-local    : ttft {r['local']['ttft_ms']:8.1f} ms   decode {r['local']['ms_per_token']:7.2f} ms/token",
        f"  distributed  : ttft {r['distributed']['ttft_ms']:8.1f} ms   decode "
        f"{r['distributed']['ms_per_token']:7.2f} ms/token",
        f"  distributed / local = {r['ratio_distributed_over_local']:.3f} (target <= {r['target_ratio']})"])


def compare_trace(args: argparse.Namespace, art: Path) -> dict[str, Any]:
    """Decode ms/token (the head's figure) with a recording tracer on and off, alternating
    which goes first; each traced run starts its own tracer, appending to one record."""
    record = args.trace or args.workdir / "trace-compare.jsonl"
    record.unlink(missing_ok=True)
    rows: dict[str, list[float]] = {"untraced": [], "traced": []}
    paired: list[float] = []  # traced / untraced within a rep: the two runs are seconds apart
    with even_cluster(args, art) as (cluster, client, plan):
        for rep in range(args.reps + 1):  # rep 0 warms up
            for traced in (False, True) if rep % 2 else (True, False):
                tracer = record_during(cluster.url, cluster.cluster, record, append=True) if traced \
                    else contextlib.nullcontext()
                with tracer:
                    remote = generate_remote(client, cluster.cluster, GenerateRequest(
                        id=new_request_id(), prompt=PROMPT, max_tokens=args.new_tokens), timeout=300)
                if rep:
                    rows["traced" if traced else "untraced"].append(remote.ms_per_token)
                print(f"rep {rep}: {'traced  ' if traced else 'untraced'} {remote.ms_per_token:.2f} ms/token",
                      file=sys.stderr, flush=True)
            if rep:
                paired.append(rows["traced"][-1] / rows["untraced"][-1])
    med = {k: statistics.median(v) for k, v in rows.items()}
    return {"model": art.parent.name, "nodes": args.nodes, "threads": args.threads, "new_tokens": args.new_tokens,
            "reps": args.reps, "stages": [f"{s.node}:{s.first}-{s.last}" for s in plan.stages],
            "untraced_ms_per_token": med["untraced"], "traced_ms_per_token": med["traced"],
            "ratio_traced_over_untraced": med["traced"] / med["untraced"],
            "median_paired_ratio": statistics.median(paired), "target_ratio": 1.03,
            "runs": rows, "record": str(record)}


def trace_table(r: dict[str, Any]) -> str:
    return "\n".join([
        f"model {r['model']}, {r['nodes']} nodes x {r['threads']} thread(s), {r['new_tokens']} new tokens, "
        f"median of {r['reps']}; stages {' '.join(r['stages'])}",
        f"  untraced : {r['untraced_ms_per_token']:7.2f} ms/token",
        f"  traced   : {r['traced_ms_per_token']:7.2f} ms/token (recording to {r['record']})",
        f"  traced / untraced = {r['ratio_traced_over_untraced']:.3f}, median of per-rep ratios "
        f"{r['median_paired_ratio']:.3f} (target <= {r['target_ratio']})"])
