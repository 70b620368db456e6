"""The tiny, export and run-local commands as a user runs them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from linguamq.tools.cli import main

Capsys = pytest.CaptureFixture[str]


def cli(capsys: Capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_tiny_writes_the_same_bytes_twice(tmp_path: Path, capsys: Capsys) -> None:
    for name in ("a", "b"):
        code, out, _ = cli(capsys, "tiny", "qwen2", "--out", str(tmp_path / name), "--layers", "1",
                           "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--vocab", "300", "--seed", "4")
        assert code == 0 and "Qwen2ForCausalLM" in out
    for file in sorted((tmp_path / "a").iterdir()):
        assert file.read_bytes() == (tmp_path / "b" / file.name).read_bytes(), file.name
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (config["num_key_value_heads"], config["vocab_size"], config["model_type"]) == (1, 300, "qwen2")


def test_export_reports_each_piece_then_run_local_generates(tmp_path: Path, capsys: Capsys) -> None:
    code, _, err = cli(capsys, "export", "--model", "tiny-llama", "--out", str(tmp_path / "art"), "--max-context", "64")
    assert code == 0
    progress = [line for line in err.splitlines() if line.startswith("[")]
    assert [line.split()[1] for line in progress] == ["embed", "layer.0", "layer.1", "head"]
    assert json.loads((tmp_path / "art" / "manifest.json").read_bytes())["name"] == "tiny-llama"

    code, out, _ = cli(capsys, "run-local", str(tmp_path / "art"), "--prompt", "Once upon a time",
                       "--max-tokens", "12", "--json")
    result = json.loads(out)
    assert code == 0 and set(result) >= {"tokens", "text", "ttft_ms", "ms_per_token", "stop_reason"}
    assert result["stop_reason"] in ("eos", "max_tokens") and 1 <= len(result["tokens"]) <= 12
    assert (len(result["tokens"]) == 12) == (result["stop_reason"] == "max_tokens")

    code, streamed, _ = cli(capsys, "run-local", str(tmp_path / "art"), "--prompt", "Once upon a time",
                            "--max-tokens", "12")
    assert code == 0 and streamed == result["text"] + "\n"  # greedy: the same text, streamed


def test_export_int4_says_so_and_run_local_generates(tmp_path: Path, capsys: Capsys) -> None:
    code, _, err = cli(capsys, "export", "--model", "tiny-llama", "--out", str(tmp_path / "art"), "--quantize", "int4",
                       "--max-context", "64")
    assert code == 0 and "fp32/int4" in err.splitlines()[-1]
    assert json.loads((tmp_path / "art" / "manifest.json").read_bytes())["quantization"] == "int4"
    code, out, _ = cli(capsys, "run-local", str(tmp_path / "art"), "--prompt", "Once upon a time",
                       "--max-tokens", "12", "--json")
    assert code == 0 and json.loads(out)["stop_reason"] in ("eos", "max_tokens")


def test_export_int4_with_fp16_is_refused_in_one_line(tmp_path: Path, capsys: Capsys) -> None:
    code, _, err = cli(capsys, "export", "--model", "tiny-llama", "--out", str(tmp_path / "art"), "--quantize", "int4",
                       "--dtype", "fp16")
    assert code == 2
    assert err.strip().splitlines()[-1] == ("linguamq export: error: --quantize int4 needs --dtype fp32 "
                                            "(weights are quantized from float32)")


def test_run_local_samples_with_a_fresh_seed_it_reports_and_replays(tmp_path: Path, capsys: Capsys) -> None:
    assert cli(capsys, "export", "--model", "tiny-llama", "--out", str(tmp_path / "art"), "--max-context", "64")[0] == 0

    def sampled(*seed: str) -> dict:
        code, out, _ = cli(capsys, "run-local", str(tmp_path / "art"), "--prompt", "Once upon a time",
                           "--max-tokens", "24", "--temperature", "1", "--json", *seed)
        assert code == 0
        return json.loads(out)

    first, second = sampled(), sampled()
    assert first["seed"] != second["seed"] and first["tokens"] != second["tokens"]
    assert sampled("--seed", str(first["seed"]))["tokens"] == first["tokens"]  # the reported seed replays it
    code, _, err = cli(capsys, "run-local", str(tmp_path / "art"), "--prompt", "Hi", "--max-tokens", "2",
                       "--seed", "41")
    assert code == 0 and "seed 41]" in err


def broken_dir(source: Path, dest: Path, problem: str) -> Path:
    shutil.copytree(source, dest)
    if problem == "unknown architecture":
        config = json.loads((dest / "config.json").read_text())
        (dest / "config.json").write_text(json.dumps(config | {"architectures": ["FalconForCausalLM"]}))
    elif problem == "wrong dtype":
        tensors = load_file(dest / "model.safetensors")
        tensors["model.norm.weight"] = tensors["model.norm.weight"].astype(np.int8)
        save_file(tensors, str(dest / "model.safetensors"), metadata={"format": "pt"})
    else:  # a sharded checkpoint with its second shard gone
        tensors = load_file(dest / "model.safetensors")
        (dest / "model.safetensors").unlink()
        names = sorted(tensors)
        files = {n: f"model-0000{1 + (i % 2)}-of-00002.safetensors" for i, n in enumerate(names)}
        for file in set(files.values()):
            save_file({n: tensors[n] for n in names if files[n] == file}, str(dest / file), metadata={"format": "pt"})
        (dest / "model.safetensors.index.json").write_text(json.dumps({"weight_map": files}))
        (dest / "model-00002-of-00002.safetensors").unlink()
    return dest


@pytest.mark.parametrize(("problem", "named"), [
    ("unknown architecture", "FalconForCausalLM"),
    ("wrong dtype", "model.norm.weight"),
    ("missing shard", "model-00002-of-00002.safetensors"),
])
def test_broken_model_dirs_fail_with_one_clear_line(problem: str, named: str, family_dirs: dict[str, Path],
                                                    tmp_path: Path, capsys: Capsys) -> None:
    path = broken_dir(family_dirs["llama"], tmp_path / "broken", problem)
    code, out, err = cli(capsys, "export", "--model", str(path), "--out", str(tmp_path / "art"))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and named in lines[0] and "Traceback" not in err, err


@pytest.mark.slow
def test_the_installed_command_prints_no_traceback(family_dirs: dict[str, Path], tmp_path: Path) -> None:
    path = broken_dir(family_dirs["llama"], tmp_path / "broken", "wrong dtype")
    proc = subprocess.run([sys.executable, "-m", "linguamq.tools.cli", "export", "--model", str(path),
                           "--out", str(tmp_path / "art")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and "I8" in proc.stderr, proc.stderr


def test_run_local_on_a_directory_without_artifacts_fails_cleanly(tmp_path: Path, capsys: Capsys) -> None:
    code, _, err = cli(capsys, "run-local", str(tmp_path), "--prompt", "hi")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "manifest.json" in err


@pytest.mark.parametrize(("flags", "error"), [
    (("--broker", "mqtt://127.0.0.1:1", "--max-queued-messages", "5"), "--max-queued-messages is a setting of the embedded broker"),
    (("--session-expiry", "0"), "--session-expiry must be positive"),
    (("--max-inflight-messages", "-1"), "--max-inflight-messages must be positive"),
    (("--max-inflight-messages", "65536"), "--max-inflight-messages must be at most 65535"),
    (("--max-queued-bytes", "-1"), "--max-queued-bytes must be >= 0"),
    (("--broker", "mqtt://127.0.0.1:1", "--max-queued-bytes", "0"), "--max-queued-bytes is a setting of the embedded"),
])
def test_hub_refuses_broker_limits_it_cannot_apply(tmp_path: Path, capsys: Capsys, flags: tuple[str, ...],
                                                   error: str) -> None:
    code, _, err = cli(capsys, "hub", "--artifacts", str(tmp_path), *flags)
    assert code == 2 and error in err


@pytest.mark.parametrize("rows", ["0", "1025"])
def test_node_refuses_a_batch_size_it_cannot_carry(capsys: Capsys, rows: str) -> None:
    code, _, err = cli(capsys, "node", "--broker", "mqtt://127.0.0.1:1", "--name", "n1", "--max-batch", rows)
    assert code == 2 and f"--max-batch must be between 1 and 1024, got {rows}" in err
