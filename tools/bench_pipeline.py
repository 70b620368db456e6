"""`linguamq bench pipeline`: decode ms/token of N local node processes vs run-local.

Same model, same thread count per process, alternating repetitions so noise on this
shared machine hits both sides alike; medians and their ratio. The model (a ~100M
llama made by `linguamq tiny`) is built once into --workdir and reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from linguamq.node.runtime import RuntimeSettings
from linguamq.schemas.requests import GenerateRequest
from linguamq.tools.cluster import LocalCluster, NodeSpec
from linguamq.tools.local import generate_local, open_local
from linguamq.tools.remote import generate_remote, new_request_id
from linguamq.topics.client import MqttClient

NAME = "pipeline"
HELP = "decode ms/token of local node processes vs run-local (~100M model)"
PROMPT = "The distributed pipeline carries activations between small devices over MQTT topics. "


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=Path("out/bench"), help="model cache and logs")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="ORT threads per node and for run-local (default 1)")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)


def run(args: argparse.Namespace) -> int:
    art = bench_model(args.workdir, layers=args.layers, hidden=args.hidden, heads=args.heads, vocab=args.vocab)
    report = measure(args, art)
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


def bench_model(workdir: Path, *, layers: int, hidden: int, heads: int, vocab: int) -> Path:
    """Artifacts of a tiny llama of these dimensions, built once under ``workdir``."""
    root = workdir / f"llama-L{layers}-H{hidden}-A{heads}-V{vocab}"
    if not (root / "art" / "manifest.json").exists():
        from linguamq.models.export import ExportOptions, export_model  # torch: only when building
        from linguamq.models.tiny import TinySpec, make_tiny
        print(f"building the model in {root} (once) ...", file=sys.stderr, flush=True)
        make_tiny(TinySpec(family="llama", layers=layers, hidden=hidden, heads=heads, vocab=vocab), root / "hf")
        export_model(root / "hf", root / "art", ExportOptions(max_context=1024))
    return root / "art"


def measure(args: argparse.Namespace, art: Path) -> dict[str, Any]:
    local = open_local(art, RuntimeSettings(intra_op_threads=args.threads, allow_spinning=False))
    prompt_ids = local.tokenizer.encode(PROMPT).ids
    nodes = [NodeSpec(f"n{i + 1}", threads=args.threads) for i in range(args.nodes)]
    rows: dict[str, list[tuple[float, float]]] = {"local": [], "distributed": []}
    with LocalCluster(artifacts=art, nodes=nodes, workdir=args.workdir / "pipeline-run", cluster="bench") as cluster, \
            MqttClient(url=cluster.url, client_id="bench-pipeline") as client:
        plan = cluster.wait_ready(client, timeout=180)
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
            "prompt_tokens": len(prompt_ids), "reps": args.reps,
            "stages": [f"{s.node}:{s.first}-{s.last}" for s in plan.stages], **med,
            "ratio_distributed_over_local": med["distributed"]["ms_per_token"] / med["local"]["ms_per_token"],
            "target_ratio": 1.10}


def table(r: dict[str, Any]) -> str:
    return "\n".join([
        f"model {r['model']} ({r['params'] / 1e6:.0f}M params), {r['nodes']} nodes x {r['threads']} thread(s), "
        f"{r['prompt_tokens']} prompt + {r['new_tokens']} new tokens, median of {r['reps']}",
        f"  stages: {' '.join(r['stages'])}",
        f"  run-local    : ttft {r['local']['ttft_ms']:8.1f} ms   decode {r['local']['ms_per_token']:7.2f} ms/token",
        f"  distributed  : ttft {r['distributed']['ttft_ms']:8.1f} ms   decode "
        f"{r['distributed']['ms_per_token']:7.2f} ms/token",
        f"  distributed / local = {r['ratio_distributed_over_local']:.3f} (target <= {r['target_ratio']})"])
