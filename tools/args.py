"""Command-line arguments shared by several commands (light: no model code imported)."""

from __future__ import annotations

import argparse


def add_generation_arguments(parser: argparse.ArgumentParser, *, seed_default: int | None) -> None:
    """--prompt, --max-tokens, sampling and --stop, as run-local and generate take them."""
    parser.add_argument("--prompt", required=True, help="prompt text")
    parser.add_argument("--max-tokens", type=int, default=64, metavar="N", help="tokens to generate (default 64)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off (default)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1.0 = off (default)")
    parser.add_argument("--seed", type=int, default=seed_default,
                        help="sampling seed" + ("" if seed_default is None else f" (default {seed_default})"))
    parser.add_argument("--stop", action="append", default=[], metavar="STR",
                        help="stop once the text contains STR (repeatable)")
