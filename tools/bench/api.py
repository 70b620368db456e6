"""`linguamq bench api`: what the OpenAI API adds to a streamed answer.

One cluster (hub with --http, three nodes on the even split), one chat question, greedy:
alternately a streamed chat completion through the API (the `openai` package) and the same
question through ``linguamq.Client.stream`` (what `linguamq generate` runs). Both are timed
the same way, at the caller, as the pieces arrive: ms/token = (last piece - first piece) /
(tokens - 1), time to first token from the call. Medians and their ratio.

The model: SmolLM2-135M-Instruct as `linguamq demo` exports it (exported here if missing).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import linguamq
from linguamq.tools.commands.demo import demo_model
from linguamq.tools.testing.cluster import LocalCluster, NodeSpec, linguamq_argv
from linguamq.topics.client import MqttClient

QUESTION = "Give me three tips for staying healthy."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", type=Path, default=Path("out/demo"),
                        help="where the demo's export is (or goes) and the cluster's logs (default out/demo)")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--reps", type=int, default=8)
    parser.add_argument("--gateway", choices=("hub", "serve"), default="hub",
                        help="the API of `hub --http` (default) or of a `linguamq serve` process of its own")


def run(args: argparse.Namespace) -> int:
    import openai  # the API's client, as users run it: only this bench needs it (dev extra)

    art = demo_model(args.workdir / "smollm2", "smollm2", lambda *a, **kw: print(*a, file=sys.stderr, **kw))
    messages: Any = [{"role": "user", "content": QUESTION}]  # openai types it as its own TypedDicts
    rows: dict[str, list[tuple[float, float]]] = {"api": [], "client": []}
    nodes = [NodeSpec(f"n{i + 1}") for i in range(args.nodes)]
    hub_args = ("--http", "0") if args.gateway == "hub" else ()
    with LocalCluster(artifacts=art, nodes=nodes, workdir=args.workdir / "bench-api", cluster="bench",
                      objective="even", hub_args=hub_args) as cluster, contextlib.ExitStack() as stack:
        with MqttClient(url=cluster.url, client_id="bench-api-wait") as waiter:
            plan = cluster.wait_ready(waiter, nodes=args.nodes, timeout=180)
        http = cluster.http if args.gateway == "hub" else stack.enter_context(_serve(cluster.url, "bench"))
        api = openai.OpenAI(base_url=f"{http}/v1", api_key="unused", max_retries=0, timeout=300)
        with linguamq.Client(cluster.url, cluster="bench", timeout=300) as client:
            def through_api() -> tuple[list[float], int, str]:
                stream = api.chat.completions.create(model="smollm2", messages=messages, max_tokens=args.new_tokens,
                                                     temperature=0, stream=True,
                                                     stream_options={"include_usage": True})
                times, text, tokens = [], [], 0
                for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        times.append(time.perf_counter())
                        text.append(chunk.choices[0].delta.content)
                    if chunk.usage is not None:
                        tokens = chunk.usage.completion_tokens
                return times, tokens, "".join(text)

            def through_client() -> tuple[list[float], int, str]:
                times, text = [], []
                with client.stream(messages=messages, max_tokens=args.new_tokens, temperature=0) as stream:
                    for piece in stream:
                        times.append(time.perf_counter())
                        text.append(piece)
                assert stream.result is not None
                return times, len(stream.result.tokens), "".join(text)

            answers = set()
            for rep in range(args.reps + 1):  # rep 0 warms both up; the order alternates
                for name in ("api", "client") if rep % 2 else ("client", "api"):
                    t0 = time.perf_counter()
                    times, tokens, text = (through_api if name == "api" else through_client)()
                    answers.add(text)
                    ttft, per_token = (times[0] - t0) * 1e3, (times[-1] - times[0]) * 1e3 / max(1, tokens - 1)
                    if rep:
                        rows[name].append((ttft, per_token))
                    print(f"rep {rep}: {name:6} {per_token:6.2f} ms/token, ttft {ttft:6.1f} ms, {tokens} tokens",
                          file=sys.stderr, flush=True)
            if len(answers) != 1:
                raise RuntimeError(f"the API and the client answered differently: {answers}")
    med = {k: {"ttft_ms": statistics.median(r[0] for r in v), "ms_per_token": statistics.median(r[1] for r in v)}
           for k, v in rows.items()}
    report: dict[str, Any] = {
        "model": "smollm2", "gateway": args.gateway, "nodes": args.nodes, "stages": [f"{s.node}:{s.first}-{s.last}" for s in plan.stages],
        "new_tokens": args.new_tokens, "reps": args.reps, **med,
        "ratio_api_over_client": med["api"]["ms_per_token"] / med["client"]["ms_per_token"], "target_ratio": 1.05,
        "runs": rows}
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


@contextlib.contextmanager
def _serve(broker: str, cluster: str) -> Iterator[str]:
    """A `linguamq serve` process of its own; yields its URL."""
    with subprocess.Popen(linguamq_argv("--log-level", "warning", "serve", "--broker", broker, "--cluster", cluster,
                                        "--port", "0"), stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            yield proc.stdout.readline().split()[1]  # "serving http://127.0.0.1:PORT ..."
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def table(r: dict[str, Any]) -> str:
    return "\n".join([
        f"{r['model']}, API of {r['gateway']}, {r['nodes']} nodes ({' '.join(r['stages'])}), {r['new_tokens']} new tokens, greedy, "
        f"median of {r['reps']} alternating",
        f"  linguamq.Client (generate): ttft {r['client']['ttft_ms']:7.1f} ms   decode "
        f"{r['client']['ms_per_token']:6.2f} ms/token",
        f"  OpenAI API (openai package): ttft {r['api']['ttft_ms']:7.1f} ms   decode "
        f"{r['api']['ms_per_token']:6.2f} ms/token",
        f"  API / client = {r['ratio_api_over_client']:.3f} (target <= {r['target_ratio']})"])
