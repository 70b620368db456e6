"""Single-process generation: every piece in order, in one SegmentRuntime.

This is the reference every distributed run is compared with (`linguamq run-local`,
tests, benches): the same node runtime and sampler the nodes run, minus the network.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from linguamq.hub.chat import ChatEncoder, chat_encoder, load_template
from linguamq.hub.head import PREFILL_CHUNK, prefill_chunks
from linguamq.hub.textstream import StopReason, TextStream, stop_reason
from linguamq.node.runtime import RuntimeSettings, SegmentRuntime
from linguamq.node.sampling import SamplingParams, sample, step_rng
from linguamq.schemas.manifest import ModelManifest
from linguamq.schemas.requests import random_seed

MANIFEST = "manifest.json"


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationResult:
    tokens: tuple[int, ...]  # generated ids, the EOS token included when it ended the run
    text: str  # decoded generated text (special tokens skipped), cut before a stop string
    prompt_tokens: int
    ttft_ms: float  # prompt in -> first token sampled (prefill + head + sampling)
    ms_per_token: float  # mean time of each further token (0.0 when only one)
    stop_reason: StopReason
    seed: int  # the sampling seed used (a fresh one if none was given): pass it to replay

    def to_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self) | {"tokens": list(self.tokens)}


@dataclasses.dataclass(frozen=True)
class LocalModel:
    """An artifact directory opened for local generation."""

    manifest: ModelManifest
    runtime: SegmentRuntime
    tokenizer: Tokenizer
    encode_chat: ChatEncoder  # messages -> prompt ids, as the head makes them (ChatError: no template)


def open_local(artifact_dir: Path | str, settings: RuntimeSettings = RuntimeSettings()) -> LocalModel:
    """Load every piece of an exported model into one runtime, plus its tokenizer."""
    artifact_dir = Path(artifact_dir)
    manifest = ModelManifest.from_json((artifact_dir / MANIFEST).read_bytes())
    runtime = SegmentRuntime(manifest=manifest, artifact_dir=artifact_dir, first=0,
                             last=len(manifest.pieces) - 1, settings=settings)
    tokenizer = Tokenizer.from_file(str(artifact_dir / manifest.tokenizer_file))
    return LocalModel(manifest=manifest, runtime=runtime, tokenizer=tokenizer,
                      encode_chat=chat_encoder_for(artifact_dir, manifest, tokenizer))


def chat_encoder_for(artifact_dir: Path, manifest: ModelManifest, tokenizer: Tokenizer) -> ChatEncoder:
    """messages -> prompt ids for an exported model: its chat template, then its tokenizer
    without special tokens (the template writes those). run-local and the hub's head
    (tools/hub.py) both use this, so a chat gives the same tokens through either."""
    return chat_encoder(load_template(artifact_dir, manifest),
                        lambda text: tokenizer.encode(text, add_special_tokens=False).ids)


def generate_local(runtime: SegmentRuntime, *, prompt_ids: Sequence[int], max_tokens: int,
                   sampling: SamplingParams = SamplingParams(), eos_token_ids: Sequence[int] = (),
                   decode: Callable[[list[int]], str] | None = None, stop: Sequence[str] = (),
                   on_text: Callable[[str], None] | None = None, session: str = "local") -> GenerationResult:
    """Generate up to `max_tokens` after `prompt_ids` with a KV cache.

    Stops at an EOS id, at `max_tokens`, or (with `decode`) once the text contains a
    `stop` string. `on_text` receives the text as it becomes final (a stop string and
    an incomplete UTF-8 tail are held back). Without a seed it picks one, as the head does.
    The prompt runs in the head's chunks: the same arithmetic as a cluster, and a bounded peak.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    seed = random_seed() if sampling.seed is None else sampling.seed
    sampling = dataclasses.replace(sampling, seed=seed)
    stream = TextStream(decode, tuple(stop), on_text)
    eos = frozenset(eos_token_ids)
    runtime.drop(session)
    try:
        started = time.perf_counter()
        ids = np.asarray([prompt_ids], dtype=np.int64)
        *chunks, (last, _) = prefill_chunks(ids.shape[1], PREFILL_CHUNK)  # as the head sends them
        for start, end in chunks:
            runtime.run(session, ids[:, start:end], np.arange(start, end)[None])
        token = _step(runtime, session, ids[:, last:], last, sampling, 0)
        first = time.perf_counter()
        tokens, reason = [token], stop_reason(token, eos, stream, [token], max_tokens)
        while reason is None:
            token = _step(runtime, session, np.asarray([[token]], dtype=np.int64),
                          len(prompt_ids) + len(tokens) - 1, sampling, len(tokens))
            tokens.append(token)
            reason = stop_reason(token, eos, stream, tokens, max_tokens)
        done = time.perf_counter()
    finally:
        runtime.drop(session)
    return GenerationResult(tokens=tuple(tokens), text=stream.finish(tokens), prompt_tokens=len(prompt_ids),
                            ttft_ms=(first - started) * 1e3,
                            ms_per_token=(done - first) * 1e3 / (len(tokens) - 1) if len(tokens) > 1 else 0.0,
                            stop_reason=reason, seed=seed)


def _step(runtime: SegmentRuntime, session: str, ids: np.ndarray, start: int, sampling: SamplingParams,
          step: int) -> int:
    """Run ids at positions start.. and sample token number `step` (seeded per step, as nodes do)."""
    positions = np.arange(start, start + ids.shape[1], dtype=np.int64)[None]  # (1, T)
    logits = runtime.run(session, ids, positions)  # (1, V)
    return sample(logits, sampling, step_rng(sampling.seed, step))
