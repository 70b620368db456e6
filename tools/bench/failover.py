"""`linguamq bench failover`: kill -9 of a middle stage node during a long generation.

Per repetition: a cluster of --nodes node processes (even split, so every node holds a
stage), one long request; after --kill-after streamed text events the node holding the
middle stage is killed with SIGKILL. Its will marks it offline, the planner replans
without it (after the hub's --settle), the survivors load their new segments and the
head re-prefills the request from its history. Text events are timestamped as they
arrive (generate_remote's on_text). Reported per repetition:

- ``next_token_s``: kill -> the first event after it (this may be a token that had
  already passed the victim when it died);
- ``recovery_s``: kill -> the first event after the stall, i.e. the first token that
  needed the new epoch (an event whose gap to the previous one exceeds 5x the median
  gap before the kill and 0.2 s; ``next_token_s`` if there was no such gap);
- whether the request's tokens equal run-local's.

The victim is then restarted and the next repetition waits for the full cluster again.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from linguamq.client import generate_remote, new_request_id
from linguamq.node.runtime import RuntimeSettings
from linguamq.schemas.requests import GenerateRequest, GenerateResult
from linguamq.tools.bench.pipeline import PROMPT, add_model_arguments, model_from_args
from linguamq.tools.local import generate_local, open_local
from linguamq.tools.testing.cluster import LocalCluster, NodeSpec
from linguamq.topics.client import MqttClient

TARGET_S = 3.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--nodes", type=int, default=3, help="node processes (default 3; at least 3)")
    parser.add_argument("--threads", type=int, default=1, help="ORT threads per node (default 1)")
    parser.add_argument("--new-tokens", type=int, default=160, help="tokens of the long request")
    parser.add_argument("--kill-after", type=int, default=16, metavar="N",
                        help="streamed text events before the kill (default 16)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--settle", type=float, default=0.5, metavar="S",
                        help="the hub's --settle: how long the node set must be stable before a replan")


def run(args: argparse.Namespace) -> int:
    if args.nodes < 3:
        print("linguamq bench failover: error: --nodes must be at least 3 (a middle stage)", file=sys.stderr)
        return 2
    art = model_from_args(args)
    report = measure(args, art)
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


def measure(args: argparse.Namespace, art: Path) -> dict[str, Any]:
    local = open_local(art, RuntimeSettings(intra_op_threads=args.threads, allow_spinning=False))
    expected = generate_local(local.runtime, prompt_ids=local.tokenizer.encode(PROMPT).ids,
                              max_tokens=args.new_tokens, eos_token_ids=local.manifest.eos_token_ids).tokens
    specs = {f"n{i + 1}": NodeSpec(f"n{i + 1}", threads=args.threads) for i in range(args.nodes)}
    reps: list[dict[str, Any]] = []
    with LocalCluster(artifacts=art, nodes=list(specs.values()), workdir=args.workdir / "failover-run",
                      cluster="failover", objective="even", settle_s=args.settle, log_level="info") as cluster, \
            MqttClient(url=cluster.url, client_id="bench-failover") as client:
        epoch = 0
        for rep in range(args.reps):
            plan = cluster.wait_ready(client, nodes=args.nodes, after_epoch=epoch, timeout=180)
            victim = plan.stages[len(plan.stages) // 2].node
            row = one_kill(args, cluster, client, victim)
            row.update(rep=rep, victim=victim, stages=[f"{s.node}:{s.first}-{s.last}" for s in plan.stages],
                       equals_run_local=row.pop("result").tokens == expected)
            reps.append(row)
            print(f"rep {rep}: killed {victim}; next token after {row['next_token_s']:.3f} s, recovery "
                  f"{row['recovery_s']:.3f} s; equals run-local: {row['equals_run_local']}", file=sys.stderr,
                  flush=True)
            failed_over = cluster.wait_ready(client, nodes=args.nodes - 1, after_epoch=plan.epoch, timeout=60)
            cluster.start_node(specs[victim])
            epoch = failed_over.epoch
    recovery = [r["recovery_s"] for r in reps]
    return {"model": art.parent.name, "nodes": args.nodes, "threads": args.threads, "new_tokens": args.new_tokens,
            "kill_after": args.kill_after, "settle_s": args.settle, "reps": reps,
            "median_next_token_s": statistics.median(r["next_token_s"] for r in reps),
            "median_recovery_s": statistics.median(recovery), "max_recovery_s": max(recovery),
            "all_equal_run_local": all(r["equals_run_local"] for r in reps), "target_s": TARGET_S}


def one_kill(args: argparse.Namespace, cluster: LocalCluster, client: MqttClient, victim: str) -> dict[str, Any]:
    arrivals: list[float] = []
    reached = threading.Event()
    results: list[GenerateResult] = []
    errors: list[Exception] = []

    def on_text(_text: str) -> None:
        arrivals.append(time.monotonic())
        if len(arrivals) >= args.kill_after:
            reached.set()

    def generate() -> None:
        try:
            results.append(generate_remote(client, cluster.cluster, GenerateRequest(
                id=new_request_id(), prompt=PROMPT, max_tokens=args.new_tokens), on_text=on_text, timeout=120))
        except Exception as exc:  # re-raised below, in the bench's thread
            errors.append(exc)
        finally:
            reached.set()

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    if not reached.wait(120):
        raise RuntimeError("no text streamed before the kill")
    t_kill = time.monotonic()
    cluster.kill_node(victim)
    worker.join(timeout=180)
    if errors:
        raise RuntimeError(f"the request failed: {errors[0]}") from errors[0]
    result = results[0]
    if result.error is not None:
        raise RuntimeError(f"the request failed: {result.error}")
    times = list(arrivals)
    before = [b - a for a, b in itertools.pairwise(times) if b <= t_kill]
    after = [i for i, t in enumerate(times) if t > t_kill]
    if not after:
        raise RuntimeError("no text streamed after the kill: raise --new-tokens or lower --kill-after")
    stall = max(0.2, 5 * statistics.median(before)) if before else 0.2
    resumed = next((times[i] for i in after if i and times[i] - times[i - 1] > stall), times[after[0]])
    return {"next_token_s": times[after[0]] - t_kill, "recovery_s": resumed - t_kill,
            "median_gap_before_s": statistics.median(before) if before else None, "events": len(times),
            "tokens": len(result.tokens), "result": result}


def table(r: dict[str, Any]) -> str:
    lines = [(f"model {r['model']}, {r['nodes']} nodes x {r['threads']} thread(s), even split; a "
              f"{r['new_tokens']}-token request, the middle stage's node killed (SIGKILL) after {r['kill_after']} "
              f"streamed events; hub settle {r['settle_s']:g} s")]
    for row in r["reps"]:
        lines.append(f"  rep {row['rep']}: killed {row['victim']} ({' '.join(row['stages'])}): next token "
                     f"{row['next_token_s']:.3f} s, recovery {row['recovery_s']:.3f} s, equals run-local: "
                     f"{'yes' if row['equals_run_local'] else 'NO'}")
    lines.append(f"  median recovery {r['median_recovery_s']:.3f} s (max {r['max_recovery_s']:.3f}; target <= "
                 f"{r['target_s']:g} s); every output equals run-local: {'yes' if r['all_equal_run_local'] else 'NO'}")
    return "\n".join(lines)
