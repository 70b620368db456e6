"""`linguamq run-local ARTDIR --prompt TEXT` (or `--chat TEXT`): generate in one process (the reference run)."""

from __future__ import annotations

import argparse
import json
import sys

from linguamq.hub.chat import ChatError
from linguamq.node.errors import NodeError
from linguamq.node.runtime import RuntimeSettings
from linguamq.node.sampling import SamplingParams
from linguamq.schemas.errors import SchemaError
from linguamq.schemas.requests import ChatMessage
from linguamq.tools.args import add_generation_arguments, chat_messages
from linguamq.tools.local import LocalModel, generate_local, open_local


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("artifacts", metavar="ARTDIR", help="directory written by `linguamq export`")
    add_generation_arguments(parser)
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime intra-op threads (0 = auto)")
    parser.add_argument("--json", action="store_true", help="print one JSON object at the end")


def run(args: argparse.Namespace) -> int:
    try:
        sampling = SamplingParams(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)
        messages = chat_messages(args)
        local = open_local(args.artifacts, RuntimeSettings(intra_op_threads=args.threads))
        prompt = _prompt_ids(local, args.prompt, messages)
        if not prompt:
            raise NodeError("the prompt encodes to no tokens")
        result = generate_local(
            local.runtime, prompt_ids=prompt, max_tokens=args.max_tokens, sampling=sampling,
            eos_token_ids=local.manifest.eos_token_ids, stop=tuple(args.stop),
            decode=lambda ids: local.tokenizer.decode(ids, skip_special_tokens=True),
            on_text=None if args.json else _print_stream)
    except (NodeError, SchemaError, ChatError, OSError, ValueError) as exc:
        print(f"linguamq run-local: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_dict()))
    else:
        print(flush=True)
        print(f"[{len(result.tokens)} tokens, {result.stop_reason}; ttft {result.ttft_ms:.1f} ms, "
              f"{result.ms_per_token:.2f} ms/token; seed {result.seed}]", file=sys.stderr)
    return 0


def _prompt_ids(local: LocalModel, prompt: str | None, messages: tuple[ChatMessage, ...]) -> list[int]:
    """The prompt as the head tokenizes it: the text, or the chat in the model's template."""
    return local.encode_chat(messages) if messages else local.tokenizer.encode(prompt or "").ids


def _print_stream(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
