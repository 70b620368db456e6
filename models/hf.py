"""Load a local Hugging Face model directory into our reference blocks.

A directory holds `config.json`, `model.safetensors` (or `model.safetensors.index.json`
plus its shards), `tokenizer.json` and optionally `generation_config.json`. Everything
that can be wrong is checked up front and reported as one line naming the file, the
tensor or the field (`linguamq.models.errors`).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import structlog
import torch
from safetensors import SafetensorError, safe_open

from linguamq.models.bloom import BloomForCausalLM
from linguamq.models.config import ModelConfig, parse_config
from linguamq.models.errors import MissingFileError, ModelDirError, UnsupportedDtypeError, WeightsError
from linguamq.models.llama import LlamaForCausalLM
from linguamq.models.qwen2 import Qwen2ForCausalLM

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
GENERATION = "generation_config.json"
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Family -> (model class, prefix of the base model's keys in a CausalLM checkpoint).
CausalLM = LlamaForCausalLM | BloomForCausalLM  # the reference models (Qwen2's is a Llama)
FAMILIES: dict[str, tuple[type[CausalLM], str]] = {
    "llama": (LlamaForCausalLM, "model."),
    "qwen2": (Qwen2ForCausalLM, "model."),
    "bloom": (BloomForCausalLM, "transformer."),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelDir:
    """A checked model directory: its config and where its files are."""

    path: Path
    config: ModelConfig
    weight_files: tuple[Path, ...]
    tokenizer_file: Path
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None

    @property
    def name(self) -> str:
        return self.path.resolve().name


def open_model_dir(path: Path | str) -> ModelDir:
    """Check a model directory and read its config; raises ModelDirError subclasses."""
    path = Path(path)
    if not path.is_dir():
        raise MissingFileError(f"model directory {str(path)!r} does not exist")
    config = parse_config(read_json(path / CONFIG))
    generation = read_json(path / GENERATION) if (path / GENERATION).is_file() else {}
    eos = _token_ids(generation.get("eos_token_id")) or config.eos_token_ids
    bos = generation.get("bos_token_id", config.bos_token_id)
    return ModelDir(path=path, config=config, weight_files=_weight_files(path),
                    tokenizer_file=_need_file(path, TOKENIZER, "only fast tokenizers (tokenizer.json) are supported"),
                    eos_token_ids=eos, bos_token_id=bos)


def load_model(model_dir: ModelDir) -> CausalLM:
    """Build the family's reference model in float32 and load the checkpoint into it."""
    cls, prefix = FAMILIES[model_dir.config.family]
    model = cls(model_dir.config)
    expected = model.state_dict()
    tensors = _read_tensors(model_dir, expected, prefix)
    with torch.no_grad():
        for name, tensor in tensors.items():
            expected[name].copy_(tensor)
    return model.eval()


def read_json(path: Path) -> dict[str, Any]:
    """A model directory's JSON object file, or one line saying what is wrong with it."""
    if not path.is_file():
        raise MissingFileError(f"{path.name} is missing in {str(path.parent)!r}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelDirError(f"{path.name} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelDirError(f"{path.name} is not a JSON object")
    return data


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(int(v) for v in value) if isinstance(value, list) else (int(value),)


def _need_file(path: Path, name: str, hint: str = "") -> Path:
    if not (path / name).is_file():
        raise MissingFileError(f"{name} is missing in {str(path)!r}" + (f" ({hint})" if hint else ""))
    return path / name


def _weight_files(path: Path) -> tuple[Path, ...]:
    if (path / WEIGHTS).is_file():
        return (path / WEIGHTS,)
    if not (path / INDEX).is_file():
        raise MissingFileError(f"no weights in {str(path)!r}: neither {WEIGHTS} nor {INDEX} "
                               "(only safetensors checkpoints are supported)")
    weight_map = read_json(path / INDEX).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ModelDirError(f"{INDEX} has no weight_map")
    shards = tuple(dict.fromkeys(weight_map.values()))
    for shard in shards:
        if not (path / shard).is_file():
            raise MissingFileError(f"shard {shard!r} listed in {INDEX} is missing in {str(path)!r}")
    return tuple(path / shard for shard in shards)


def _read_tensors(model_dir: ModelDir, expected: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Every expected tensor, float32, shape-checked; a tied lm_head may be absent."""
    found: dict[str, torch.Tensor] = {}
    for file in model_dir.weight_files:
        found.update(_read_file(file, expected, prefix))
    optional = {"lm_head.weight"} if model_dir.config.tie_word_embeddings else set()
    missing = [name for name in expected if name not in found and name not in optional]
    if missing:
        raise WeightsError(f"tensor {missing[0]!r} is missing from the checkpoint"
                           + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    return found


def _read_file(file: Path, expected: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                name = _canonical(key, prefix)
                if name not in expected:
                    structlog.get_logger().debug("ignoring tensor", tensor=key, file=file.name)
                    continue
                out[name] = _read_tensor(f, key, file, expected[name])
    except SafetensorError as exc:
        raise WeightsError(f"{file.name} is not a readable safetensors file: {exc}") from exc
    return out


def _read_tensor(f: Any, key: str, file: Path, like: torch.Tensor) -> torch.Tensor:
    dtype = f.get_slice(key).get_dtype()
    if dtype not in SAFETENSORS_DTYPES:
        raise UnsupportedDtypeError(f"tensor {key!r} in {file.name} has dtype {dtype}; "
                                    f"supported: {', '.join(SAFETENSORS_DTYPES)}")
    tensor = f.get_tensor(key)
    if tuple(tensor.shape) != tuple(like.shape):
        raise WeightsError(f"tensor {key!r} in {file.name} has shape {tuple(tensor.shape)}, "
                           f"config.json implies {tuple(like.shape)}")
    return tensor.to(torch.float32)


def _canonical(key: str, prefix: str) -> str:
    """Checkpoints saved from the base model lack the CausalLM prefix ("h.0..." for BLOOM)."""
    if key.startswith(prefix) or key.startswith("lm_head."):
        return key
    return prefix + key
