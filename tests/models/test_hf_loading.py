"""Loading HF directories: sharded checkpoints, and one clear error per broken directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from linguamq.models.errors import MissingFileError, UnsupportedArchitectureError, UnsupportedDtypeError, WeightsError
from linguamq.models.hf import load_model, open_model_dir


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def shard(path: Path) -> list[str]:
    """Split model.safetensors into two shards with an index, as HF writes big models."""
    tensors = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(tensors)
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    for file, part in zip(files, halves, strict=True):
        save_file({n: tensors[n] for n in part}, str(path / file), metadata={"format": "pt"})
    weight_map = {n: files[i] for i, part in enumerate(halves) for n in part}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return files


def test_sharded_checkpoint_loads_the_same_weights(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    sharded = _copy(tiny_dirs["qwen2"], tmp_path / "sharded")
    shard(sharded)
    a, b = load_model(open_model_dir(tiny_dirs["qwen2"])), load_model(open_model_dir(sharded))
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name


def test_missing_shard_is_named(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    path = _copy(tiny_dirs["llama"], tmp_path / "m")
    files = shard(path)
    (path / files[1]).unlink()
    with pytest.raises(MissingFileError, match=files[1]):
        open_model_dir(path)


def test_unknown_architecture_is_named(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    path = _copy(tiny_dirs["llama"], tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | {"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedArchitectureError, match="GPT2LMHeadModel"):
        open_model_dir(path)


def test_unsupported_tensor_dtype_is_named(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    path = _copy(tiny_dirs["bloom"], tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    name = "transformer.h.0.mlp.dense_h_to_4h.weight"
    tensors[name] = tensors[name].astype(np.int8)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(UnsupportedDtypeError, match=r"dense_h_to_4h.*I8"):
        load_model(open_model_dir(path))


def test_unsupported_config_dtype_is_named(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    path = _copy(tiny_dirs["llama"], tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | {"torch_dtype": "int8"}))
    with pytest.raises(UnsupportedDtypeError, match="int8"):
        open_model_dir(path)


def test_missing_tensor_and_wrong_shape_are_named(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    path = _copy(tiny_dirs["llama"], tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(WeightsError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        load_model(open_model_dir(path))
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(cfg | {"intermediate_size": 64}))
    with pytest.raises(WeightsError, match="shape"):
        load_model(open_model_dir(path))


def test_checkpoint_without_the_causal_lm_prefix_loads(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    """bigscience/bloom-560m style keys: `h.0...` instead of `transformer.h.0...`."""
    path = _copy(tiny_dirs["bloom"], tmp_path / "m")
    tensors = load_file(path / "model.safetensors")
    bare = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    save_file(bare, str(path / "model.safetensors"), metadata={"format": "pt"})
    a, b = load_model(open_model_dir(tiny_dirs["bloom"])), load_model(open_model_dir(path))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.mark.parametrize("missing", ["config.json", "tokenizer.json", "model.safetensors"])
def test_missing_file_is_named(missing: str, tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    path = _copy(tiny_dirs["qwen2"], tmp_path / "m")
    (path / missing).unlink()
    with pytest.raises(MissingFileError, match=missing.replace(".", r"\.")):
        open_model_dir(path)


def test_generation_config_eos_wins_over_config(tiny_dirs: dict[str, Path], tmp_path: Path) -> None:
    path = _copy(tiny_dirs["llama"], tmp_path / "m")
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9], "bos_token_id": 3}))
    d = open_model_dir(path)
    assert (d.eos_token_ids, d.bos_token_id) == ((7, 9), 3)
    (path / "generation_config.json").unlink()
    d = open_model_dir(path)
    assert (d.eos_token_ids, d.bos_token_id) == ((0,), 0)  # from config.json


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_checkpoints_load_as_float32(dtype: torch.dtype, tiny_dirs: dict[str, Path],
                                                    tmp_path: Path) -> None:
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    path = _copy(tiny_dirs["llama"], tmp_path / "m")
    tensors = {k: v.to(dtype) for k, v in load_torch(path / "model.safetensors").items()}
    save_torch(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    model = load_model(open_model_dir(path))
    for name, value in model.state_dict().items():
        assert value.dtype == torch.float32 and torch.equal(value, tensors[name].float()), name
