"""Next-token sampling in numpy: greedy, temperature, top-k, top-p (nucleus).

The one sampler every node holding the `head` piece uses, and run-local with it.
Randomness comes only from the numpy Generator passed in. Generators are made per step
(`step_rng(seed, step)`), not per session: whichever node samples step k of a seeded
session, after a replan or a re-prefill too, draws the same token as run-local.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from linguamq.node.errors import SamplingError


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """temperature 0 = greedy (argmax); top_k 0 = no limit; top_p 1.0 = no nucleus cut."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and np.isfinite(self.temperature)):
            raise SamplingError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and self.seed < 0:
            raise SamplingError(f"seed must be >= 0, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def step_rng(seed: int | None, step: int) -> np.random.Generator:
    """The generator for step `step` (0 = the first generated token) of a session.

    Seeded: a pure function of (seed, step), so whichever node samples a step (after a
    replan, a failover, a re-prefill) draws the same token. Unseeded: fresh OS entropy.
    """
    if seed is None:
        return np.random.default_rng()
    if seed < 0 or step < 0:
        raise SamplingError(f"seed and step must be >= 0, got seed {seed}, step {step}")
    return np.random.default_rng([seed, step])


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    """One token id from logits of shape (V,) or (1, V)."""
    row = np.asarray(logits, dtype=np.float64).reshape(-1)  # (V,)
    if row.size == 0 or not np.isfinite(row).any():
        raise SamplingError("logits are empty or all non-finite")
    if params.greedy:
        return int(np.argmax(row))
    ids, probs = candidates(row, params)
    return int(ids[min(np.searchsorted(np.cumsum(probs), rng.random() * probs.sum()), ids.size - 1)])


def candidates(row: np.ndarray, params: SamplingParams) -> tuple[np.ndarray, np.ndarray]:
    """Token ids allowed by top-k and top-p, most likely first, with their probabilities."""
    scaled = np.where(np.isfinite(row), row / params.temperature, -np.inf)  # (V,)
    k = row.size if params.top_k == 0 else min(params.top_k, row.size)
    ids = np.argpartition(-scaled, k - 1)[:k] if k < row.size else np.arange(row.size)
    ids = ids[np.argsort(-scaled[ids], kind="stable")]  # (k,) most likely first
    probs = np.exp(scaled[ids] - scaled[ids[0]])
    probs /= probs.sum()
    if params.top_p < 1.0:
        # Keep the smallest prefix whose mass reaches top_p (always at least one token).
        keep = int(np.searchsorted(np.cumsum(probs), params.top_p)) + 1
        ids, probs = ids[:keep], probs[:keep] / probs[:keep].sum()
    return ids, probs
