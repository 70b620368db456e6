"""`linguamq bench quality`: what int8 and int4 exports cost in greedy agreement with fp32.

For each model (random Llama, Qwen2 and BLOOM at the bench model's dims by default, and
SmolLM2-135M-Instruct when its package is installed), exports fp32, int8 and int4, then
greedy-decodes `--new-tokens` tokens after each prompt (chat prompts for SmolLM2, random
ids for the random models) with each export, EOS ignored, and compares with fp32:
  - prefix: the fraction of positions before the first token that differs;
  - agreement: the fraction of positions whose tokens are equal (free-running);
  - forced: the fraction of positions where the export's argmax equals fp32's when both
    read fp32's continuation (one early flip does not cascade).
Random models have near-flat logits, so their figures exaggerate what a real model loses.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

VARIANTS = ("fp32", "int8", "int4")
CHATS = ("Explain how a rainbow forms, step by step.",
         "Write a short story about a robot who learns to paint.",
         "What are the main differences between Python and C? Give examples.",
         "Describe the water cycle to a ten-year-old.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--families", default="llama,qwen2,bloom",
                        help="random models to build (comma-separated; '' for none)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--smollm2", choices=("auto", "yes", "no"), default="auto",
                        help="include SmolLM2-135M-Instruct (auto: when its package is installed)")
    parser.add_argument("--prompts", type=int, default=4, help="prompts per model (default 4)")
    parser.add_argument("--prompt-tokens", type=int, default=24, help="random models' prompt length")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--threads", type=int, default=2)


def run(args: argparse.Namespace) -> int:
    rows = []
    with tempfile.TemporaryDirectory(prefix="linguamq-quality-") as tmp:
        for name, hf_dir in _models(args, Path(tmp)):
            rows.extend(_measure_model(args, name, hf_dir, Path(tmp) / name))
    report = {"new_tokens": args.new_tokens, "prompts": args.prompts, "threads": args.threads, "rows": rows}
    print(json.dumps(report, indent=2) if args.json else _table(report))
    return 0


def _models(args: argparse.Namespace, tmp: Path) -> list[tuple[str, Path]]:
    from linguamq.models.gguf import NAMED, gguf_to_model_dir, named_gguf  # torch: this process only
    from linguamq.models.tiny import TinySpec, make_tiny

    models = []
    for family in filter(None, args.families.split(",")):
        make_tiny(TinySpec(family=family, layers=args.layers, hidden=args.hidden, heads=args.heads,
                           vocab=args.vocab), tmp / family)
        models.append((f"random {family}", tmp / family))
    if args.smollm2 == "yes" or (args.smollm2 == "auto" and _installed(NAMED["smollm2"][1])):
        print("reading the SmolLM2 GGUF ...", file=sys.stderr, flush=True)
        models.append(("smollm2", gguf_to_model_dir(named_gguf("smollm2"), tmp / "smollm2-hf")))  # type: ignore[arg-type]
    return models


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _measure_model(args: argparse.Namespace, name: str, hf_dir: Path, out: Path) -> list[dict[str, Any]]:
    from linguamq.models.export import ExportOptions, export_model
    from linguamq.node.runtime import RuntimeSettings
    from linguamq.tools.local import open_local

    models = {}
    for variant in VARIANTS:
        print(f"{name}: exporting {variant} ...", file=sys.stderr, flush=True)
        options = ExportOptions(quantize="none" if variant == "fp32" else variant)  # type: ignore[arg-type]
        export_model(hf_dir, out / variant, options)
        models[variant] = open_local(out / variant, RuntimeSettings(intra_op_threads=args.threads))
    prompts = _prompts(args, name, models["fp32"])
    reference = [_greedy(models["fp32"], ids, args.new_tokens) for ids in prompts]
    rows = []
    for variant, model in models.items():
        runs = [_compare(model, ids, ref) for ids, ref in zip(prompts, reference)]
        rows.append({"model": name, "variant": variant,
                     "mb": sum(p.bytes for p in model.manifest.pieces) / 1e6,
                     **{key: statistics.mean(r[key] for r in runs) for key in ("prefix", "agreement", "forced")},
                     "per_prompt": runs})
    return rows


def _prompts(args: argparse.Namespace, name: str, model: Any) -> list[list[int]]:
    from linguamq.schemas.requests import ChatMessage

    if name == "smollm2":
        return [list(model.encode_chat((ChatMessage(role="user", content=text),)))
                for text in (CHATS * args.prompts)[:args.prompts]]
    vocab = model.manifest.vocab_size
    return [np.random.default_rng(seed).integers(1, vocab, args.prompt_tokens).tolist() for seed in range(args.prompts)]


def _greedy(model: Any, ids: list[int], new_tokens: int) -> list[int]:
    from linguamq.tools.local import generate_local

    return list(generate_local(model.runtime, prompt_ids=ids, max_tokens=new_tokens).tokens)  # EOS ignored


def _compare(model: Any, ids: list[int], ref: list[int]) -> dict[str, Any]:
    got = _greedy(model, ids, len(ref))
    prefix = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), len(ref))
    forced = _forced_argmax(model, ids + ref[:-1], len(ids))
    return {"prefix": prefix / len(ref), "agreement": float(np.mean(np.array(got) == np.array(ref))),
            "forced": float(np.mean(np.array(forced) == np.array(ref))), "tokens": got}


def _forced_argmax(model: Any, ids: list[int], prompt: int) -> list[int]:
    """The argmax after each position from `prompt - 1` on, reading `ids` (teacher forcing)."""
    run = model.runtime.run
    out = [int(np.argmax(run("forced", np.array([ids[:prompt]]), np.arange(prompt)[None])))]
    for t in range(prompt, len(ids)):
        out.append(int(np.argmax(run("forced", np.array([[ids[t]]]), np.array([[t]])))))
    model.runtime.drop("forced")
    return out


def _table(r: dict[str, Any]) -> str:
    lines = [f"greedy agreement with the fp32 export: {r['new_tokens']} new tokens, mean of {r['prompts']} prompts",
             f"{'model':16}{'export':8}{'MB':>9}{'prefix':>9}{'agreement':>11}{'forced':>9}"]
    for row in r["rows"]:
        lines.append(f"{row['model']:16}{row['variant']:8}{row['mb']:>9.1f}{row['prefix']:>9.2f}"
                     f"{row['agreement']:>11.2f}{row['forced']:>9.2f}")
    lines.append("prefix: identical greedy tokens before the first difference; agreement: equal tokens, "
                 "free-running; forced: equal argmax reading fp32's tokens")
    return "\n".join(lines)
