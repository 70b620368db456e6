"""`linguamq demo`: the whole system end to end on this machine, then stop everything.

Builds a tiny model (once), starts a hub and three nodes that behave like devices of
different speeds, each with room for only ~60% of the model (so the planner must split
it), generates from a prompt through the pipeline while streaming the text, shows which
node holds which layers and why, and checks the output equals run-local's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from linguamq.client import generate_remote, new_request_id
from linguamq.models.export import ExportOptions, export_model
from linguamq.models.tiny import TinySpec, make_tiny
from linguamq.planner import cost
from linguamq.schemas.manifest import ModelManifest
from linguamq.schemas.requests import GenerateRequest
from linguamq.tools.local import generate_local, open_local
from linguamq.tools.testing.cluster import LocalCluster, NodeSpec
from linguamq.tools.trace.export import export
from linguamq.tools.trace.tracer import record_during
from linguamq.topics.client import MqttClient, MqttError

NODES = (NodeSpec("phone-a", slowdown=1.0), NodeSpec("phone-b", slowdown=2.0), NodeSpec("tablet", slowdown=3.0))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=Path("out/demo"), help="where the demo writes (default out/demo)")
    parser.add_argument("--family", choices=("llama", "qwen2", "bloom"), default="llama")
    parser.add_argument("--prompt", default="The quick brown fox", help="prompt text")
    parser.add_argument("--max-tokens", type=int, default=32, metavar="N")
    parser.add_argument("--json", action="store_true", help="print a JSON summary at the end")


def run(args: argparse.Namespace) -> int:
    say = (lambda *a, **kw: print(*a, file=sys.stderr, **kw)) if args.json else print
    started = time.monotonic()
    art = _model(args.workdir / f"tiny-{args.family}", args.family, say)
    manifest = ModelManifest.from_json((art / "manifest.json").read_bytes())
    budget = cost.share_mb(manifest, share=0.6)
    nodes = [dataclasses.replace(n, mem_budget_mb=budget) for n in NODES]
    say(f"starting a hub and {len(nodes)} nodes, each with room for ~60% of the model ({budget:.0f} MB): "
        + ", ".join(f"{n.name} (x{n.slowdown:g} slower)" for n in nodes))
    try:
        with LocalCluster(artifacts=art, nodes=nodes, workdir=args.workdir / "run", cluster="demo") as cluster, \
                MqttClient(url=cluster.url, client_id="demo-client") as client:
            plan = cluster.wait_ready(client, timeout=120)
            placement = _placement(plan, manifest)
            for line in placement:
                say(f"  {line}")
            say(f"\nprompt: {args.prompt!r}\ngenerated: ", end="") if not args.json else None
            request = GenerateRequest(id=new_request_id(), prompt=args.prompt, max_tokens=args.max_tokens)
            record = args.workdir / "trace.jsonl"
            with record_during(cluster.url, cluster.cluster, record, results=True):
                result = generate_remote(client, cluster.cluster, request, timeout=120,
                                         on_text=None if args.json else _print_stream)
    except (MqttError, OSError) as exc:
        print(f"linguamq demo: error: {exc}", file=sys.stderr)
        return 2
    local = open_local(art)
    reference = generate_local(local.runtime, prompt_ids=local.tokenizer.encode(args.prompt).ids,
                               max_tokens=args.max_tokens, eos_token_ids=manifest.eos_token_ids)
    same = result.tokens == reference.tokens
    traces = {"record": str(record), "perfetto": str(args.workdir / "trace.perfetto.json"),
              "png": str(args.workdir / "trace.png")}
    export(record, perfetto_out=Path(traces["perfetto"]), png_out=Path(traces["png"]))
    summary = {"placement": placement, "tokens": list(result.tokens), "text": result.text,
               "ttft_ms": result.ttft_ms, "ms_per_token": result.ms_per_token, "stop_reason": result.stop_reason,
               "equals_run_local": same, "traces": traces, "seconds": round(time.monotonic() - started, 1)}
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"\n\n{len(result.tokens)} tokens ({result.stop_reason}), ttft {result.ttft_ms:.1f} ms, "
              f"{result.ms_per_token:.1f} ms/token across {len(plan.stages)} nodes")
        print(f"equals run-local: {'yes' if same else 'NO'} (the model is random, so the text is gibberish; "
              "what matters is that the tokens match)")
        print(f"trace of this run: {traces['perfetto']} (open in ui.perfetto.dev or chrome://tracing), "
              f"{traces['png']} (Gantt chart)")
        print(f"demo finished in {summary['seconds']} s; logs in {args.workdir / 'run'}")
    return 0 if same and result.error is None else 1


def _model(root: Path, family: str, say) -> Path:
    art = root / "art"
    if (art / "manifest.json").exists():
        return art
    say(f"building a tiny {family} model in {root} (once)")
    make_tiny(TinySpec(family=family, layers=6, hidden=128, heads=4, vocab=512, seed=7), root / "hf")
    export_model(root / "hf", art, ExportOptions(name=f"tiny-{family}"))
    return art


def _placement(plan, manifest: ModelManifest) -> list[str]:
    lines = []
    for stage in plan.stages:
        names = [p.name for p in manifest.pieces[stage.first:stage.last + 1]]
        lines.append(f"{stage.node}: pieces {stage.first}-{stage.last} ({', '.join(names)}), "
                     f"predicted {stage.predicted_ms:.2f} ms/token")
    lines += [f"{left.node}: left out ({left.why})" for left in plan.left_out]
    return lines


def _print_stream(text: str) -> None:
    # A random model emits control bytes: show them escaped, never raw on a terminal.
    sys.stdout.write("".join(c if c.isprintable() or c == "\n" else f"\\x{ord(c):02x}" for c in text))
    sys.stdout.flush()
