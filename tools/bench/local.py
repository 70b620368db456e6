"""`linguamq bench local`: run-local (ONNX pieces) against transformers on the same weights.

Builds a ~100M-parameter random Llama (`linguamq tiny llama`: 12 layers, hidden 768,
vocab 32000) in a temporary directory, exports it, then alternates repetitions of
  - run-local: `generate_local` in a child process (which never imports torch, so its
    peak RSS is what a node would use), and
  - transformers: `generate(use_cache=True)` greedy, timed per token by a streamer,
with torch.set_num_threads == ONNX Runtime intra-op threads. Reports medians of TTFT
and decode ms/token, their ratios, and run-local's peak RSS against the weights' bytes.
Targets: decode >= 1.5x faster; peak RSS <= 1.3 x weights + 200 MB.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

SPEEDUP_TARGET = 1.5
RSS_FACTOR, RSS_SLACK_MB = 1.3, 200
CHILD = "from linguamq.tools.bench.local import child_main; child_main()"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=None, help="default: heads / 2")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--threads", type=int, default=2, help="torch threads = ORT intra-op threads (default 2)")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of each side (default 5)")


def run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="linguamq-bench-") as tmp:
        hf_dir, art_dir = _build(args, Path(tmp))
        report = _measure(args, hf_dir, art_dir)
    print(json.dumps(report, indent=2) if args.json else _table(report))
    return 0


def _build(args: argparse.Namespace, tmp: Path) -> tuple[Path, Path]:
    from linguamq.models.export import export_model  # torch: parent process only
    from linguamq.models.tiny import TinySpec, make_tiny

    print("building the model ...", file=sys.stderr, flush=True)
    make_tiny(TinySpec(family="llama", layers=args.layers, hidden=args.hidden, heads=args.heads,
                       kv_heads=args.kv_heads, vocab=args.vocab), tmp / "hf")
    export_model(tmp / "hf", tmp / "art")
    return tmp / "hf", tmp / "art"


def _measure(args: argparse.Namespace, hf_dir: Path, art_dir: Path) -> dict[str, Any]:
    prompt = np.random.default_rng(0).integers(1, args.vocab, args.prompt_tokens).tolist()
    config = {"artifacts": str(art_dir), "threads": args.threads, "prompt": prompt, "new_tokens": args.new_tokens}
    hf = _HFRunner(hf_dir, args.threads, prompt, args.new_tokens)
    ours: list[dict[str, float]] = []
    theirs: list[dict[str, float]] = []
    with subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(config)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as child:
        _ask(child, "run")  # warm-up, both sides
        hf.once()
        for rep in range(args.reps):  # alternate, so that machine noise hits both alike
            print(f"repetition {rep + 1}/{args.reps}", file=sys.stderr, flush=True)
            ours.append(_ask(child, "run"))
            theirs.append(hf.once())
        final = _ask(child, "quit")
    weights = (hf_dir / "model.safetensors").stat().st_size
    return _report(args, ours, theirs, final, weights, hf.params)


def _ask(child: subprocess.Popen[str], command: str) -> dict[str, Any]:
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(command + "\n")
    child.stdin.flush()
    line = child.stdout.readline()
    if not line:
        raise RuntimeError("the run-local child process died (see its stderr above)")
    return json.loads(line)


class _HFRunner:
    """transformers greedy generate with KV cache, timed token by token."""

    def __init__(self, hf_dir: Path, threads: int, prompt: list[int], new_tokens: int) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
        self.params = sum(p.numel() for p in self.model.parameters())
        self.ids = torch.tensor([prompt])
        self.new_tokens = new_tokens

    def once(self) -> dict[str, float]:
        import torch

        clock = _streamer()
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            started = time.perf_counter()
            self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), do_sample=False, use_cache=True,
                                max_new_tokens=self.new_tokens, min_new_tokens=self.new_tokens,
                                pad_token_id=0, streamer=clock)
        stamps = clock.stamps[1:]  # the first put() is the prompt
        return {"ttft_ms": (stamps[0] - started) * 1e3,
                "ms_per_token": (stamps[-1] - stamps[0]) * 1e3 / (len(stamps) - 1)}


def _streamer() -> Any:
    from transformers.generation.streamers import BaseStreamer

    class Clock(BaseStreamer):
        def __init__(self) -> None:
            self.stamps: list[float] = []

        def put(self, value: Any) -> None:
            self.stamps.append(time.perf_counter())

        def end(self) -> None:
            pass

    return Clock()


def child_main() -> None:
    """The run-local side, in its own process: answers `run` / `quit` lines on stdin."""
    from linguamq.node.runtime import RuntimeSettings
    from linguamq.tools import logs
    from linguamq.tools.local import generate_local, open_local

    logs.configure(level="warning")  # stdout carries the answers; logs go to stderr
    config = json.loads(sys.argv[1])
    local = open_local(config["artifacts"], RuntimeSettings(intra_op_threads=config["threads"]))
    for line in sys.stdin:
        if line.strip() == "quit":
            print(json.dumps({"peak_rss_mb": _peak_rss_kib() / 1024}), flush=True)
            return
        result = generate_local(local.runtime, prompt_ids=config["prompt"], max_tokens=config["new_tokens"])
        print(json.dumps({"ttft_ms": result.ttft_ms, "ms_per_token": result.ms_per_token}), flush=True)


def _peak_rss_kib() -> int:
    """VmHWM of this process. Not ru_maxrss: Linux carries the forking parent's high-water
    mark (torch and all) across exec into the child's ru_maxrss."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS


def _report(args: argparse.Namespace, ours: list[dict[str, float]], theirs: list[dict[str, float]],
            final: dict[str, Any], weights: int, params: int) -> dict[str, Any]:
    med = {side: {key: statistics.median(r[key] for r in runs) for key in ("ttft_ms", "ms_per_token")}
           for side, runs in (("run_local", ours), ("transformers", theirs))}
    limit_mb = RSS_FACTOR * weights / 2**20 + RSS_SLACK_MB
    decode_speedup = med["transformers"]["ms_per_token"] / med["run_local"]["ms_per_token"]
    return {
        "model": {"family": "llama", "layers": args.layers, "hidden": args.hidden, "heads": args.heads,
                  "kv_heads": args.kv_heads or args.heads // 2, "vocab": args.vocab, "params": params,
                  "weights_mb": weights / 2**20},
        "threads": args.threads, "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
        "reps": args.reps,
        "run_local": med["run_local"] | {"peak_rss_mb": final["peak_rss_mb"],
                                         "ms_per_token_all": [r["ms_per_token"] for r in ours],
                                         "ttft_ms_all": [r["ttft_ms"] for r in ours]},
        "transformers": med["transformers"] | {"ms_per_token_all": [r["ms_per_token"] for r in theirs],
                                               "ttft_ms_all": [r["ttft_ms"] for r in theirs]},
        "decode_speedup": decode_speedup,
        "ttft_speedup": med["transformers"]["ttft_ms"] / med["run_local"]["ttft_ms"],
        "rss_over_weights": final["peak_rss_mb"] * 2**20 / weights,
        "rss_limit_mb": limit_mb,
        "targets_met": {"decode_speedup": decode_speedup >= SPEEDUP_TARGET,
                        "peak_rss": final["peak_rss_mb"] <= limit_mb},
    }


def _table(r: dict[str, Any]) -> str:
    m, ours, theirs = r["model"], r["run_local"], r["transformers"]
    return "\n".join([
        f"model: llama {m['layers']} layers, hidden {m['hidden']}, {m['heads']}/{m['kv_heads']} heads, "
        f"vocab {m['vocab']}, {m['params'] / 1e6:.1f}M params, {m['weights_mb']:.0f} MiB fp32",
        f"threads {r['threads']}, prompt {r['prompt_tokens']} tokens, {r['new_tokens']} new, "
        f"median of {r['reps']} (alternating)",
        f"{'':14}{'TTFT ms':>10}{'decode ms/token':>18}",
        f"{'run-local':14}{ours['ttft_ms']:>10.1f}{ours['ms_per_token']:>18.2f}",
        f"{'transformers':14}{theirs['ttft_ms']:>10.1f}{theirs['ms_per_token']:>18.2f}",
        f"{'speedup':14}{r['ttft_speedup']:>9.2f}x{r['decode_speedup']:>17.2f}x   (target decode >= "
        f"{SPEEDUP_TARGET}x: {'met' if r['targets_met']['decode_speedup'] else 'MISSED'})",
        f"run-local peak RSS {ours['peak_rss_mb']:.0f} MiB = {r['rss_over_weights']:.2f} x weights "
        f"(limit {r['rss_limit_mb']:.0f} MiB: {'met' if r['targets_met']['peak_rss'] else 'MISSED'})",
    ])
