"""`linguamq tiny NAME --out HFDIR`: write a deterministic random model (a real HF directory)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from linguamq.models.errors import ModelsError
from linguamq.models.tiny import FAMILY_NAMES, TinySpec, make_tiny


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TinySpec()
    parser.add_argument("family", metavar="NAME", choices=FAMILY_NAMES, help=f"one of {', '.join(FAMILY_NAMES)}")
    parser.add_argument("--out", required=True, metavar="HFDIR", help="directory to write")
    parser.add_argument("--layers", type=int, default=d.layers, help=f"decoder layers (default {d.layers})")
    parser.add_argument("--hidden", type=int, default=d.hidden, help=f"hidden size (default {d.hidden})")
    parser.add_argument("--heads", type=int, default=d.heads, help=f"attention heads (default {d.heads})")
    parser.add_argument("--kv-heads", type=int, default=None,
                        help="key/value heads (default: heads/2 for llama and qwen2; bloom: = heads)")
    parser.add_argument("--vocab", type=int, default=d.vocab, help=f"vocabulary size (default {d.vocab})")
    parser.add_argument("--intermediate", type=int, default=None,
                        help="MLP size (default 8/3 hidden rounded up to 32; bloom: 4 hidden)")
    parser.add_argument("--seed", type=int, default=d.seed, help=f"random seed (default {d.seed})")


def spec_from_args(args: argparse.Namespace) -> TinySpec:
    return TinySpec(family=args.family, layers=args.layers, hidden=args.hidden, heads=args.heads,
                    kv_heads=args.kv_heads, vocab=args.vocab, intermediate=args.intermediate, seed=args.seed)


def run(args: argparse.Namespace) -> int:
    try:
        cfg = make_tiny(spec_from_args(args), args.out)
    except ModelsError as exc:
        print(f"linguamq tiny: error: {exc}", file=sys.stderr)
        return 2
    size = (Path(args.out) / "model.safetensors").stat().st_size
    print(f"wrote {cfg.architecture} ({cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
          f"{size / 1e6:.1f} MB of weights) to {args.out}")
    return 0
