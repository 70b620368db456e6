"""`linguamq bench local` end to end on a very small model (the real run: SmolLM2 and ~100M params)."""

from __future__ import annotations

import json
import sys

import pytest

from linguamq.tools.cli import main

TINY = ["--model", "bench", "--layers", "1", "--hidden", "64", "--heads", "4", "--vocab", "300", "--threads", "1"]


@pytest.mark.slow
def test_bench_local_measures_every_engine_and_quantization_at_both_contexts(
        capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["bench", "local", "--json", *TINY, "--reps", "2", "--new-tokens", "4", "--short-prompt", "8",
                 "--long-prompt", "40", "--engines", "run-local,transformers"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    (model,) = report["models"]
    assert set(model["runs"]) == {"run-local fp32", "run-local int8", "run-local int4", "transformers"}
    for label, run in model["runs"].items():
        for ctx in ("short", "long"):  # every engine ran --reps times at both contexts, all tokens generated
            assert len(run[ctx]["ms_per_token_all"]) == 2 and all(ms > 0 for ms in run[ctx]["ms_per_token_all"])
            assert run[ctx]["ttft_ms"] > 0 and run[ctx]["tokens"] == 4
        assert run["long"]["prefill_tokens_per_s"] > 0 and run["peak_rss_mb"] > 0
        # The run-local children never import torch, so their peak RSS is a node's.
        assert run["torch_imported"] == (label == "transformers")
    assert model["skipped"] == {}  # llama.cpp was not asked for
    targets = model["targets"]
    assert (targets["subject"], targets["reference"]) == ("run-local int4", "transformers")
    for name in ("decode_short_vs_reference", "decode_long_vs_reference", "decode_long_vs_short",
                 "prefill_vs_reference", "peak_rss_mb"):
        assert targets[name]["value"] > 0 and isinstance(targets[name]["met"], bool)
    assert targets["peak_rss_mb"]["limit"] == model["runs"]["run-local int4"]["rss_limit_mb"]


def test_bench_local_without_llama_cpp_says_how_to_install_it(capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # `import llama_cpp` raises ImportError
    code = main(["bench", "local", *TINY, "--engines", "llama.cpp"])
    out, err = capsys.readouterr()
    assert code == 0
    assert "pip install llama-cpp-python" in err and "-DGGML_AMX_INT8=OFF" in err
    assert "nothing measured" in out
