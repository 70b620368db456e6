"""run-local (ONNX pieces + node runtime + numpy sampler) against transformers."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from linguamq.node.runtime import RuntimeSettings
from linguamq.node.sampling import SamplingParams
from linguamq.tools.local import LocalModel, generate_local, open_local

FAMILIES = ("llama", "qwen2", "bloom")
TOL = 1e-4
PROMPT = 24
NEW = 48
Arts = dict[tuple[str, str], Path]


def prompt_ids(seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(1, 512, PROMPT).tolist()


def local(arts: Arts, family: str, variant: str = "fp32") -> LocalModel:
    return open_local(arts[family, variant], RuntimeSettings(intra_op_threads=1))


def greedy(model: LocalModel, ids: list[int], **kwargs: Any) -> Any:
    return generate_local(model.runtime, prompt_ids=ids, max_tokens=kwargs.pop("max_tokens", NEW), **kwargs)


def hf_greedy(hf: Any, ids: list[int], eos: int | None) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                          use_cache=True, eos_token_id=eos, pad_token_id=0 if eos is None else eos)
    return out[0, PROMPT:].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_transformers_in_prefill_and_cached_decode(
        family: str, family_dirs: dict[str, Path], family_artifacts: Arts, load_hf: Callable) -> None:
    hf, model = load_hf(family_dirs[family]), local(family_artifacts, family)
    ids = prompt_ids() + np.random.default_rng(1).integers(1, 512, 8).tolist()
    with torch.no_grad():
        expected = hf(torch.tensor([ids])).logits[0].numpy()  # (T, V): full recompute, no cache
    got = [model.runtime.run("s", np.array([ids[:PROMPT]]), np.arange(PROMPT)[None])[0]]
    for t in range(PROMPT, len(ids)):  # one token at a time against the KV cache
        got.append(model.runtime.run("s", np.array([[ids[t]]]), np.array([[t]]))[0])
    assert np.abs(np.stack(got) - expected[PROMPT - 1:]).max() < TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_continuation_equals_transformers_generate(
        family: str, family_dirs: dict[str, Path], family_artifacts: Arts, load_hf: Callable) -> None:
    ids = prompt_ids()
    ours = greedy(local(family_artifacts, family), ids)  # no EOS: always NEW tokens
    assert ours.stop_reason == "max_tokens" and len(ours.tokens) == NEW
    assert list(ours.tokens) == hf_greedy(load_hf(family_dirs[family]), ids, eos=None)
    assert len(set(ours.tokens)) > NEW // 4  # the comparison is not between two constant runs


@pytest.mark.parametrize("family", FAMILIES)
def test_eos_stops_generation_like_transformers(
        family: str, family_dirs: dict[str, Path], family_artifacts: Arts, load_hf: Callable) -> None:
    model, ids = local(family_artifacts, family), prompt_ids()
    full = list(greedy(model, ids).tokens)
    stop_at = next(i for i in range(5, NEW) if full[i] not in full[:i])  # first fresh token after 5
    result = greedy(model, ids, eos_token_ids=(full[stop_at],))
    assert result.stop_reason == "eos" and list(result.tokens) == full[:stop_at + 1]
    assert list(result.tokens) == hf_greedy(load_hf(family_dirs[family]), ids, eos=full[stop_at])


def test_manifest_eos_is_what_run_local_uses(family_artifacts: Arts) -> None:
    model = local(family_artifacts, "llama")
    full = list(greedy(model, prompt_ids(2)).tokens)
    stop_at = next(i for i in range(3, NEW) if full[i] not in full[:i])
    manifest = dataclasses.replace(model.manifest, eos_token_ids=(full[stop_at],))
    result = greedy(model, prompt_ids(2), eos_token_ids=manifest.eos_token_ids)
    assert (result.stop_reason, len(result.tokens)) == ("eos", stop_at + 1)


def test_stop_string_cuts_text_and_streams_what_is_final(family_artifacts: Arts) -> None:
    model = local(family_artifacts, "qwen2")
    decode = lambda t: model.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    text = greedy(model, prompt_ids(), decode=decode, max_tokens=20).text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert len(stop) == 2, text
    streamed: list[str] = []
    result = greedy(model, prompt_ids(), decode=decode, stop=(stop,), on_text=streamed.append)
    assert result.stop_reason == "stop" and result.text == text[:text.index(stop)]
    assert "".join(streamed) == result.text


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(family_artifacts: Arts) -> None:
    model = local(family_artifacts, "bloom")
    params = SamplingParams(temperature=1.0, top_k=40, top_p=0.95, seed=3)
    a, b = greedy(model, prompt_ids(), sampling=params), greedy(model, prompt_ids(), sampling=params)
    assert a.tokens == b.tokens
    assert a.tokens != greedy(model, prompt_ids()).tokens
    assert a.tokens != greedy(model, prompt_ids(), sampling=dataclasses.replace(params, seed=4)).tokens


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("variant", ["fp16", "int8", "int4"])
def test_fp16_int8_and_int4_generate_and_mostly_agree_with_fp32(
        family: str, variant: str, family_artifacts: Arts, record_property: Callable) -> None:
    reference = local(family_artifacts, family)
    model = local(family_artifacts, family, variant)
    ids = prompt_ids()
    ref, got = list(greedy(reference, ids).tokens), list(greedy(model, ids).tokens)
    prefix = next((i for i, (x, y) in enumerate(zip(ref, got)) if x != y), NEW)
    # Teacher-forced: both read the fp32 continuation, so one early flip does not cascade.
    forced = _forced_argmax(model, ids + ref[:-1])
    agreement = float(np.mean(np.array(forced) == np.array(ref)))
    record_property("greedy_prefix", prefix)
    record_property("teacher_forced_agreement", agreement)
    print(f"{family} {variant}: identical greedy prefix {prefix}/{NEW}, teacher-forced agreement {agreement:.2f}")
    assert len(got) == NEW
    # Floors well under what these models give (fp16: 1.00 on every family; int8 dynamic
    # quantization: 0.88-0.98; int4 blocks: 0.67-0.71, random logits being nearly flat) and
    # far above chance (1/512), so a broken export fails (`bench quality` has the real figures).
    # The identical greedy prefix is only reported: one flip ends it.
    assert agreement >= {"fp16": 0.9, "int8": 0.5, "int4": 0.3}[variant]


def _forced_argmax(model: LocalModel, ids: list[int]) -> list[int]:
    out = [int(np.argmax(model.runtime.run("f", np.array([ids[:PROMPT]]), np.arange(PROMPT)[None])))]
    for t in range(PROMPT, len(ids)):
        out.append(int(np.argmax(model.runtime.run("f", np.array([[ids[t]]]), np.array([[t]])))))
    model.runtime.drop("f")
    return out
