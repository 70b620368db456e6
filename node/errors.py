"""Errors raised by `linguamq.node`. Messages are one line a user or a log reader can act on."""

from __future__ import annotations


class NodeError(Exception):
    """Base class for everything the node runtime rejects."""


class ArtifactError(NodeError):
    """A piece file is missing, does not match its sha256, or does not match the manifest."""


class SamplingError(NodeError):
    """Sampling parameters are out of range, or logits are not usable."""


class RuntimeInputError(NodeError):
    """A run got inputs it cannot take (shape, dtype, positions not following the cache)."""


class ContextOverflowError(RuntimeInputError):
    """A session asked for a position at or past the manifest's max_context."""


class InferenceError(NodeError):
    """ONNX Runtime failed while running a piece; the session's cache was dropped."""
