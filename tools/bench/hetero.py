"""`linguamq bench hetero`: four emulated heterogeneous devices on the ~100M model.

The devices are node processes with `--slowdown` 1, 1.5, 3 and 4 (each compute is
followed by a sleep of (X-1) times its length) and a memory budget that holds only
``--mem-share`` of the model as the planner counts memory, so that no device holds it
all and the model must be split. Parts (each on a fresh cluster, same node caches):

- (a) planned (``--objective latency``) vs LinguaLinked's even split, one stream:
  decode tokens/s and their ratio;
- (b) a throughput plan (the planner told of ``--streams`` sessions in flight, 4 by
  default): that many concurrent requests vs 1, aggregate tokens/s (tokens over wall
  time, prefill included), the plan's own prediction for them, each stream's decode rate
  summed (what the plan predicts: prompts left out), each node's decode steps per call
  while they run (how well batches form) and its busy share, and the epochs the plan went
  through (each re-prefills every session); ``--trace FILE`` records the
  multi-stream phases (`linguamq trace --from FILE`);
- (c) under load, the fastest device (the planned pipeline's busiest) throttled 3x
  (NodeControl) with rebalancing vs without (the same planner with
  ``--drift-ratio inf``): tokens/s from the throttle to the end of the window;
- (d) the planned plan's predicted ms/token vs the head's measured ms/token and the
  retained plan's own measured figure.

On this machine all node processes share its cores; with ``--threads 1`` and one stream
only one node computes at a time and the emulated slowness is sleep, which uses no
CPU, so the ratios follow the emulated speeds; with 4 streams the nodes whose work is
mostly sleep pipeline for free while the 1x node's real compute competes for the cores.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from linguamq import topics
from linguamq.client import generate_remote, new_request_id
from linguamq.planner import cost
from linguamq.schemas.cluster import NodeControl, Plan, Profile
from linguamq.schemas.manifest import ModelManifest
from linguamq.schemas.requests import GenerateRequest, GenerateResult
from linguamq.tools.bench.pipeline import PROMPT, add_model_arguments, model_from_args
from linguamq.tools.testing.cluster import LocalCluster, NodeSpec
from linguamq.tools.testing.followers import PlanLog, TelemetryLog, rows_per_call
from linguamq.tools.trace.tracer import record_during
from linguamq.topics.client import MqttClient

PARTS = ("a", "b", "c", "d")
PIPELINED_TARGETS = {4: 2.65, 8: 4.0}  # (b): N streams vs 1 (issue 16); the paper's best is 2.65x at 4
TELEMETRY_LAG_S = 1.5  # nodes report about once a second
TARGETS = {"planned_over_even": 1.6, "pipelined_over_single": 2.65, "rebalanced_over_static": 1.3,
           "prediction_error": 0.15}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--slowdowns", default="1,1.5,3,4", help="one emulated device per value (default 1,1.5,3,4)")
    parser.add_argument("--mem-share", type=float, default=0.6,
                        help="each device's memory budget holds this share of the model (default 0.6)")
    parser.add_argument("--threads", type=int, default=1, help="ORT threads per node (default 1)")
    parser.add_argument("--new-tokens", type=int, default=48, help="tokens per request")
    parser.add_argument("--reps", type=int, default=3, help="single-stream requests measured per plan")
    parser.add_argument("--streams", type=int, default=4, help="concurrent requests in (b) (default 4)")
    parser.add_argument("--warmup", type=float, default=8.0, metavar="S",
                        help="seconds of load before measuring, so the planner has measured every stage")
    parser.add_argument("--throttle", type=float, default=3.0, help="(c): the throttled node's slowdown factor")
    parser.add_argument("--victim", default="", metavar="NAME",
                        help="(c): the device throttled (default: the fastest, which the plan gives the most work)")
    parser.add_argument("--window", type=float, default=30.0, metavar="S", help="(c): seconds measured after it")
    parser.add_argument("--parts", default=",".join(PARTS), help="which parts to run (default a,b,c,d)")
    parser.add_argument("--trace", type=Path, metavar="FILE",
                        help="(b): record a trace of the multi-stream phases to this JSONL file (`linguamq trace --from`)")
    parser.add_argument("--max-batch", type=int, default=8, metavar="N",
                        help="the nodes' --max-batch (default 8; 1: batching off, for comparison)")


def run(args: argparse.Namespace) -> int:
    parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not parts <= set(PARTS):
        print(f"linguamq bench hetero: error: --parts takes {', '.join(PARTS)}", file=sys.stderr)
        return 2
    art = model_from_args(args)
    report = measure(args, art, parts)
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


def say(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# --- clusters --------------------------------------------------------------------------


def node_specs(args: argparse.Namespace, manifest: ModelManifest, sessions: int = 1) -> list[NodeSpec]:
    budget = cost.share_mb(manifest, args.mem_share, sessions)
    return [NodeSpec(f"d{i + 1}", slowdown=float(x), threads=args.threads, mem_budget_mb=budget,
                     args=("--max-batch", str(args.max_batch)))
            for i, x in enumerate(args.slowdowns.split(","))]


def one(client: MqttClient, cluster: str, max_tokens: int) -> GenerateResult:
    result = generate_remote(client, cluster, GenerateRequest(id=new_request_id(), prompt=PROMPT,
                                                              max_tokens=max_tokens), timeout=300)
    if result.error is not None:
        raise RuntimeError(f"request failed: {result.error}")
    return result


def warm_up(cluster: LocalCluster, client: MqttClient, seconds: float, max_tokens: int) -> Plan:
    """Load for ``seconds`` (the planner measures every stage and may correct its
    profiles), then the plan in force once all its stages are ready."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        one(client, cluster.cluster, max_tokens)
    return cluster.wait_ready(client, timeout=120)


def stages(plan: Plan) -> list[str]:
    return [f"{s.node}:{s.first}-{s.last}" for s in plan.stages]


def start(args: argparse.Namespace, art: Path, name: str, nodes: list[NodeSpec], objective: str,
          hub_args: tuple[str, ...] = ()) -> LocalCluster:
    return LocalCluster(artifacts=art, nodes=nodes, workdir=args.workdir / "hetero-run", cluster=f"hetero-{name}",
                        objective=objective, hub_args=hub_args, log_level="info")


# --- parts -----------------------------------------------------------------------------


def single_stream(args: argparse.Namespace, art: Path, name: str, nodes: list[NodeSpec],
                  objective: str) -> dict[str, Any]:
    """Median decode ms/token of --reps single-stream requests, after a warm-up."""
    with start(args, art, name, nodes, objective) as cluster, \
            MqttClient(url=cluster.url, client_id=f"bench-{name}") as client, \
            PlanLog(cluster.url, cluster.cluster) as watch:
        cluster.wait_ready(client, timeout=180)
        plan = warm_up(cluster, client, args.warmup, args.new_tokens)
        runs = [one(client, cluster.cluster, args.new_tokens).ms_per_token for _ in range(args.reps)]
        time.sleep(0.5)
        retained = watch.latest
    ms = statistics.median(runs)
    out = {"objective": objective, "epoch": plan.epoch, "stages": stages(plan), "ms_per_token": ms,
           "ms_per_token_all": runs, "tokens_per_s": 1000.0 / ms}
    if objective != "even":
        same = retained if retained is not None and retained.epoch == plan.epoch else None  # this plan, measured
        out.update(predicted_ms_per_token=plan.predicted_ms_per_token,
                   plan_measured_ms_per_token=same.measured_ms_per_token if same is not None else None)
    say(f"{name}: {out['stages']} {ms:.2f} ms/token")
    return out


def pipelined(args: argparse.Namespace, art: Path, manifest: ModelManifest) -> dict[str, Any]:
    """One request, then --streams at once, on a throughput plan for --streams sessions."""
    nodes = node_specs(args, manifest, sessions=args.streams)
    with start(args, art, "b", nodes, "throughput", ("--plan-sessions", str(args.streams))) as cluster, \
            MqttClient(url=cluster.url, client_id="bench-b") as client, \
            TelemetryLog(cluster.url, cluster.cluster) as telemetry, PlanLog(cluster.url, cluster.cluster) as plans:
        cluster.wait_ready(client, timeout=180)
        plan = warm_up(cluster, client, args.warmup, args.new_tokens)
        singles, multis, busy, spans, busy_spans = [], [], [], [], []
        decode_singles, decode_multis = [], []  # sum of each stream's 1000 / ms_per_token (decode_rate)
        if args.trace:
            args.trace.unlink(missing_ok=True)  # the phases append to it
        with concurrent.futures.ThreadPoolExecutor(args.streams) as pool:
            for _ in range(max(1, args.reps // 2 + 1)):
                started = time.perf_counter()
                result = one(client, cluster.cluster, args.new_tokens)
                singles.append(len(result.tokens) / (time.perf_counter() - started))
                decode_singles.append(decode_rate([result]))
                time.sleep(TELEMETRY_LAG_S)  # the single stream's calls are counted before
                before, busy_before = telemetry.totals(), telemetry.busy()
                tracer = (record_during(cluster.url, cluster.cluster, args.trace, append=True, settle_s=0.5)
                          if args.trace else contextlib.nullcontext())
                with tracer:
                    started, cpu = time.perf_counter(), cpu_ticks()
                    results = list(pool.map(lambda _i: one(client, cluster.cluster, args.new_tokens),
                                            range(args.streams)))
                    wall, cpu_after = time.perf_counter() - started, cpu_ticks()
                multis.append(sum(len(r.tokens) for r in results) / wall)
                decode_multis.append(decode_rate(results))
                busy.append(busy_share(cpu, cpu_after))
                time.sleep(TELEMETRY_LAG_S)
                spans.append((before, telemetry.totals()))
                busy_spans.append((busy_before, telemetry.busy(), wall))
        calls = rows_per_call(spans)
        epochs = [epoch for _t, epoch in plans.epochs()]
        modelled = measured_model(plans.latest, telemetry.profiles(), args.streams)
        for node, ms in telemetry.row_ms().items():
            calls.setdefault(node, {})["row_ms"] = ms
        for node, share in node_busy(busy_spans).items():
            calls.setdefault(node, {})["busy_share"] = share
    single, multi = statistics.median(singles), statistics.median(multis)
    decode_single, decode_multi = statistics.median(decode_singles), statistics.median(decode_multis)
    known = [b for b in busy if b is not None]
    cpu_busy = statistics.median(known) if len(known) == len(busy) else None
    say(f"b: sessions' decode steps per call with {args.streams} streams: "
        + " ".join(f"{n} {c['rows_per_call']:.2f}" for n, c in sorted(calls.items()) if c.get("calls")))
    say("b: each node's time running pieces over the streams' time: "
        + " ".join(f"{n} {c['busy_share']:.0%}" for n, c in sorted(calls.items()) if "busy_share" in c))
    say(f"b: epochs {epochs[0]}-{epochs[-1]} from the first plan on, {len(epochs) - epochs.index(plan.epoch) - 1} "
        f"after the warm-up (each re-prefills every session)" if epochs and plan.epoch in epochs else "b: no plan seen")
    say(f"b: {stages(plan)} 1 stream {single:.1f} tokens/s, {args.streams} streams {multi:.1f} tokens/s"
        + (f", the machine's CPUs {cpu_busy:.0%} busy meanwhile" if cpu_busy is not None else ""))
    say(f"b: each stream's decode rate, summed (approx.): 1 stream {decode_single:.1f} tokens/s (predicted "
        f"{tokens_per_s(plan.predicted_ms_per_token)}), {args.streams} streams {decode_multi:.1f} (predicted "
        + (f"{plan.predicted_tokens_per_s:.1f})" if plan.predicted_tokens_per_s else "n/a)"))
    say("b: each node's CPU ms per session step outside its compute (row_ms): "
        + " ".join(f"{n} {c['row_ms']:.2f}" for n, c in sorted(calls.items()) if c.get("row_ms") is not None))
    if modelled is not None:
        say(f"b: the cost model on what the nodes measured (stage times, batch costs; epoch {modelled['epoch']}), "
            f"{args.streams} streams: {modelled['tokens_per_s']:.1f} tokens/s with their row costs, "
            f"{modelled['tokens_per_s_rows_free']:.1f} without")
    return {"objective": "throughput", "plan_sessions": args.streams, "epoch": plan.epoch, "stages": stages(plan),
            "predicted_ms_per_token": plan.predicted_ms_per_token, "single_tokens_per_s": single,
            "predicted_multi_tokens_per_s": plan.predicted_tokens_per_s, "calls": calls,
            "multi_tokens_per_s": multi, "single_all": singles, "multi_all": multis,
            "pipelined_over_single": multi / single, "cpu_busy_multi": cpu_busy, "cpus": os.cpu_count(),
            "decode_single_tokens_per_s": decode_single, "decode_multi_tokens_per_s": decode_multi,
            "epochs": epochs, "measured_model": modelled}


def measured_model(plan: Plan | None, profiles: dict[str, Profile], sessions: int) -> dict[str, Any] | None:
    """tokens/s of ``sessions`` that the cost model (cost.pipelined_ms) gives ``plan`` from its
    stages' measured times (the planner's re-published figures) and the nodes' profiles as
    last reported, with and without their measured row costs: how right the model is once its
    inputs are, apart from how right the probes were. None before every stage was measured."""
    if plan is None or any(s.measured_ms is None or s.node not in profiles for s in plan.stages):
        return None
    times = [s.measured_ms for s in plan.stages if s.measured_ms is not None]
    used = [profiles[s.node] for s in plan.stages]
    free = [dataclasses.replace(p, row_ms=0.0) for p in used]
    return {"epoch": plan.epoch, "tokens_per_s": 1000 / cost.pipelined_ms(times, used, sessions),
            "tokens_per_s_rows_free": 1000 / cost.pipelined_ms(times, free, sessions)}


def tokens_per_s(ms_per_token: float) -> str:
    return f"{1000 / ms_per_token:.1f}" if ms_per_token > 0 else "n/a"


def decode_rate(results: list[GenerateResult]) -> float:
    """About the tokens/s of ``results`` decoding side by side, which is what a plan predicts:
    the sum of each one's decode rate (its first token to its last), so the time before a
    stream's first token (its prompt, and the prompts before it) is left out. Approximate both
    ways: a stream's window also holds other streams' prompts (low), and steps it decodes after
    others ended run faster (high)."""
    return sum(1000.0 / r.ms_per_token for r in results if r.ms_per_token > 0)


def node_busy(spans: list[tuple[dict[str, float], dict[str, float], float]]) -> dict[str, float]:
    """Per node, over (busy_ms before, busy_ms after, wall s) of the multi-stream phases: the
    share of that time it spent running pieces (telemetry lags ~1 s, like the calls)."""
    ms: dict[str, float] = {}
    for before, after, _wall in spans:
        for node, now in after.items():
            ms[node] = ms.get(node, 0.0) + max(0.0, now - before.get(node, now))  # restarted: nothing
    total_s = sum(wall for _b, _a, wall in spans)
    return {node: busy / (total_s * 1e3) for node, busy in ms.items()} if total_s else {}


def cpu_ticks() -> tuple[int, int] | None:
    """(busy, total) CPU ticks of the whole machine since boot (Linux /proc/stat), else None.
    (b) compares against this: emulated devices sleep, but their real compute, the broker's
    and the MQTT threads' all share this machine's cores."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def busy_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    if before is None or after is None or after[1] == before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])


def throttled(args: argparse.Namespace, art: Path, nodes: list[NodeSpec], rebalance: bool) -> dict[str, Any]:
    """Back-to-back requests; --victim (default the fastest device) is throttled, then
    --window seconds more. tokens/s: tokens of requests started after the throttle over
    the time from the first such start to the last such end."""
    name = "c-rebalanced" if rebalance else "c-static"
    hub_args = () if rebalance else ("--drift-ratio", "inf")
    done: list[tuple[float, float, int, float]] = []  # (start, end, tokens, ms_per_token)
    with start(args, art, name, nodes, "latency", hub_args) as cluster, \
            MqttClient(url=cluster.url, client_id=f"bench-{name}") as client, \
            PlanLog(cluster.url, cluster.cluster) as watch:
        cluster.wait_ready(client, timeout=180)
        before = warm_up(cluster, client, args.warmup, args.new_tokens)
        victim = args.victim or min(nodes, key=lambda n: n.slowdown).name
        slowdown = next(n.slowdown for n in nodes if n.name == victim) * args.throttle
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                started = time.monotonic()
                result = one(client, cluster.cluster, args.new_tokens)
                done.append((started, time.monotonic(), len(result.tokens), result.ms_per_token))

        worker = threading.Thread(target=load, daemon=True)
        worker.start()
        time.sleep(2.0)
        t0 = time.monotonic()
        client.publish(topics.NODE_CONTROL, topics.NODE_CONTROL.build(cluster.cluster, node=victim),
                       NodeControl(node=victim, slowdown=slowdown), wait=5.0)
        time.sleep(args.window)
        stop.set()
        worker.join(timeout=300)
        after = watch.latest
        new_epochs = [(round(t - t0, 2), e) for t, e in watch.epochs() if t > t0]
    measured = [d for d in done if d[0] >= t0]
    if not measured:
        raise RuntimeError(f"{name}: no request started after the throttle")
    span = max(d[1] for d in measured) - min(d[0] for d in measured)
    late = [d[3] for d in measured if d[0] >= t0 + args.window / 2]
    out = {"victim": victim, "throttled_to": slowdown, "before": stages(before),
           "after": stages(after) if after else [], "new_epochs_s_after_throttle": new_epochs,
           "requests": len(measured), "tokens_per_s": sum(d[2] for d in measured) / span,
           "late_ms_per_token": statistics.median(late) if late else None}
    say(f"{name}: {victim} x{slowdown:g}; {out['before']} -> {out['after']}, {out['tokens_per_s']:.1f} tokens/s")
    return out


def measure(args: argparse.Namespace, art: Path, parts: set[str]) -> dict[str, Any]:
    manifest = ModelManifest.from_json((art / "manifest.json").read_bytes())
    nodes = node_specs(args, manifest)
    report: dict[str, Any] = {
        "model": art.parent.name, "params": sum(p.params for p in manifest.pieces), "pieces": len(manifest.pieces),
        "devices": [{"name": n.name, "slowdown": n.slowdown, "mem_budget_mb": round(n.mem_budget_mb, 1)}
                    for n in nodes],
        "mem_share": args.mem_share, "threads": args.threads, "new_tokens": args.new_tokens, "reps": args.reps,
        "targets": TARGETS | {"pipelined_over_single": PIPELINED_TARGETS.get(args.streams, 2.65)}}
    if parts & {"a", "d"}:
        planned = single_stream(args, art, "a-planned", nodes, "latency")
        report["planned"] = planned
        if "a" in parts:
            even = single_stream(args, art, "a-even", nodes, "even")
            report["even"] = even
            report["planned_over_even"] = planned["tokens_per_s"] / even["tokens_per_s"]
        if "d" in parts:
            predicted = planned["predicted_ms_per_token"]
            report["prediction"] = {
                "predicted_ms_per_token": predicted, "head_ms_per_token": planned["ms_per_token"],
                "plan_measured_ms_per_token": planned["plan_measured_ms_per_token"],
                "head_over_predicted": planned["ms_per_token"] / predicted if predicted else None,
                "within_target": bool(predicted) and abs(planned["ms_per_token"] / predicted - 1)
                <= TARGETS["prediction_error"]}
    if "b" in parts:
        report["pipelined"] = pipelined(args, art, manifest)
        report["pipelined_over_single"] = report["pipelined"]["pipelined_over_single"]
    if "c" in parts:
        rebalanced = throttled(args, art, nodes, rebalance=True)
        static = throttled(args, art, nodes, rebalance=False)
        report["throttle"] = {"window_s": args.window, "factor": args.throttle, "rebalanced": rebalanced,
                              "static": static}
        report["rebalanced_over_static"] = rebalanced["tokens_per_s"] / static["tokens_per_s"]
    return report


def table(r: dict[str, Any]) -> str:
    devices = ", ".join(f"{d['name']} x{d['slowdown']:g}" for d in r["devices"])
    lines = [(f"model {r['model']} ({r['params'] / 1e6:.0f}M params, {r['pieces']} pieces); devices {devices}, "
              f"each with room for {r['mem_share']:.0%} of the model; {r['threads']} thread(s) per node")]
    for key in ("planned", "even"):  # the single-stream runs
        if key in r:
            x = r[key]
            lines.append(f"  {key:8}: {' '.join(x['stages'])}: {x['ms_per_token']:.2f} ms/token "
                         f"({x['tokens_per_s']:.1f} tokens/s)")
    if "even" in r:
        lines.append(f"  (a) planned / even = {r['planned_over_even']:.2f}x "
                     f"(target >= {TARGETS['planned_over_even']})")
    if "pipelined" in r:
        b = r["pipelined"]
        lines.append(f"  (b) throughput plan {' '.join(b['stages'])}: 1 stream {b['single_tokens_per_s']:.1f} "
                     f"tokens/s, {b['plan_sessions']} streams {b['multi_tokens_per_s']:.1f} tokens/s = "
                     f"{b['pipelined_over_single']:.2f}x (target >= {r['targets']['pipelined_over_single']})"
                     + (f"; {b['cpus']} CPUs {b['cpu_busy_multi']:.0%} busy with {b['plan_sessions']} streams"
                        if b.get("cpu_busy_multi") is not None else "")
                     + (f"; the plan predicted {b['predicted_multi_tokens_per_s']:.1f} tokens/s for them"
                        if b.get("predicted_multi_tokens_per_s") is not None else ""))
        if b.get("epochs") and b["epoch"] in b["epochs"]:
            lines.append(f"  (b) plans: epochs {b['epochs'][0]}-{b['epochs'][-1]}, "
                         f"{len(b['epochs']) - b['epochs'].index(b['epoch']) - 1} of them after the warm-up")
        if "decode_multi_tokens_per_s" in b:
            lines.append(f"  (b) each stream's decode rate, summed (approx.): 1 stream "
                         f"{b['decode_single_tokens_per_s']:.1f} tokens/s, {b['plan_sessions']} streams "
                         f"{b['decode_multi_tokens_per_s']:.1f} tokens/s")
    if "throttle" in r:
        t = r["throttle"]
        for key in ("rebalanced", "static"):
            c = t[key]
            lines.append(f"  (c) {key:10}: {c['victim']} -> x{c['throttled_to']:g}; {' '.join(c['before'])} -> "
                         f"{' '.join(c['after'])}; {c['tokens_per_s']:.1f} tokens/s over {t['window_s']:g} s")
        lines.append(f"  (c) rebalanced / static = {r['rebalanced_over_static']:.2f}x "
                     f"(target >= {TARGETS['rebalanced_over_static']})")
    if "prediction" in r:
        d = r["prediction"]
        plan_measured = d["plan_measured_ms_per_token"]
        lines.append(f"  (d) predicted {d['predicted_ms_per_token']:.2f} ms/token, head measured "
                     f"{d['head_ms_per_token']:.2f} ({d['head_over_predicted']:.2f}x), plan's own measured "
                     + (f"{plan_measured:.2f}" if plan_measured is not None else "n/a")
                     + f"; within {TARGETS['prediction_error']:.0%}: {'yes' if d['within_target'] else 'no'}")
    return "\n".join(lines)
