"""The numpy sampler: greedy, temperature, top-k, top-p, seeding."""

from __future__ import annotations

import numpy as np
import pytest

from linguamq.node.errors import SamplingError
from linguamq.node.sampling import SamplingParams, candidates, sample, step_rng

LOGITS = np.log(np.array([0.05, 0.5, 0.15, 0.3], dtype=np.float32))  # ranks: 1, 3, 2, 0


def draws(params: SamplingParams, n: int = 4000, logits: np.ndarray = LOGITS) -> np.ndarray:
    """Token drawn at each of steps 0..n-1 of one session."""
    return np.array([sample(logits, params, step_rng(params.seed, step)) for step in range(n)])


def test_greedy_is_argmax_and_ignores_the_generator() -> None:
    logits = np.random.default_rng(0).standard_normal((1, 1000)).astype(np.float32)
    assert sample(logits, SamplingParams(), np.random.default_rng(1)) == int(np.argmax(logits))
    assert set(draws(SamplingParams(seed=None), n=20).tolist()) == {1}


def test_temperature_one_follows_the_softmax() -> None:
    freq = np.bincount(draws(SamplingParams(temperature=1.0, seed=0)), minlength=4) / 4000
    assert np.abs(freq - np.exp(LOGITS)).max() < 0.03


def test_high_temperature_flattens_low_sharpens() -> None:
    hot = np.bincount(draws(SamplingParams(temperature=10.0, seed=0)), minlength=4) / 4000
    cold = np.bincount(draws(SamplingParams(temperature=0.2, seed=0)), minlength=4) / 4000
    assert hot.max() < 0.35 and cold[1] > 0.9


def test_top_k_keeps_only_the_k_most_likely() -> None:
    assert set(draws(SamplingParams(temperature=1.0, top_k=2, seed=0)).tolist()) == {1, 3}
    assert set(draws(SamplingParams(temperature=5.0, top_k=1, seed=0), n=50).tolist()) == {1}


def test_top_p_keeps_the_smallest_nucleus() -> None:
    ids, probs = candidates(LOGITS.astype(np.float64), SamplingParams(temperature=1.0, top_p=0.75))
    assert ids.tolist() == [1, 3] and probs.sum() == pytest.approx(1.0)
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.6, seed=0)).tolist()) == {1, 3}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.4, seed=0), n=50).tolist()) == {1}


def test_step_generators_depend_on_seed_and_step_only() -> None:
    a = [step_rng(5, k).random() for k in range(4)]
    assert a == [step_rng(5, k).random() for k in range(4)]  # any node, any time: the same draw
    assert len(set(a)) == 4 and step_rng(6, 0).random() != a[0]
    assert step_rng(None, 0).random() != step_rng(None, 0).random()  # unseeded: fresh entropy


def test_same_seed_same_tokens_other_seed_other_tokens() -> None:
    logits = np.random.default_rng(0).standard_normal(500)
    a = draws(SamplingParams(temperature=1.0, seed=7), n=30, logits=logits)
    b = draws(SamplingParams(temperature=1.0, seed=7), n=30, logits=logits)
    c = draws(SamplingParams(temperature=1.0, seed=8), n=30, logits=logits)
    assert a.tolist() == b.tolist() and a.tolist() != c.tolist()


def test_masked_logits_are_never_drawn() -> None:
    logits = np.array([-np.inf, 0.0, -np.inf, 0.0])
    assert set(draws(SamplingParams(temperature=1.0, seed=0), n=200, logits=logits).tolist()) == {1, 3}


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"temperature": float("nan")}, {"top_k": -1},
                                    {"top_p": 0.0}, {"top_p": 1.5}, {"seed": -1}])
def test_bad_parameters_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(SamplingError):
        SamplingParams(**kwargs)


def test_unusable_logits_are_refused() -> None:
    with pytest.raises(SamplingError):
        sample(np.full(4, np.nan), SamplingParams(), np.random.default_rng(0))
