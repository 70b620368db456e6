"""Errors raised by `linguamq.models`. Each message is one line a user can act on."""

from __future__ import annotations


class ModelsError(Exception):
    """Base class: anything wrong with a model directory, a tiny model or an export."""


class ModelDirError(ModelsError):
    """A Hugging Face model directory cannot be used."""


class MissingFileError(ModelDirError):
    """A file the model directory needs (config, weights, shard, tokenizer) is absent."""


class UnsupportedArchitectureError(ModelDirError):
    """config.json names an architecture or feature we do not implement."""


class UnsupportedDtypeError(ModelDirError):
    """A weight or the config uses a dtype we cannot load."""


class WeightsError(ModelDirError):
    """The weights do not match the config (missing tensor, wrong shape, bad file)."""


class ExportError(ModelsError):
    """ONNX export, quantization or verification failed."""
