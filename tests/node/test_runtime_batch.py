"""SegmentRuntime.run_batch: decode steps of several sessions as one call, each row as alone.

Sessions sit in rows of the KV pools; a batch runs the rows from its lowest session's to its
highest, others' rows with dummy inputs. Every session's logits must be those it gets run
alone, whatever its neighbours, its position or its row.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from linguamq.node.errors import RuntimeInputError
from linguamq.node.runtime import RuntimeSettings, SegmentRuntime

PROMPTS = {"a": 3, "b": 7, "c": 1, "d": 10}  # prompt lengths: every session at its own position
IDS = np.random.default_rng(5).integers(1, 320, (1, 40)).astype(np.int64)


def runtime(art, first: int = 0, last: int | None = None, manifest=None) -> SegmentRuntime:
    path, m = art
    m = manifest or m
    return SegmentRuntime(manifest=m, artifact_dir=path, first=first, last=len(m.pieces) - 1 if last is None else last,
                          settings=RuntimeSettings(intra_op_threads=1))


def held(rt: SegmentRuntime, sessions: tuple[str, ...]) -> np.ndarray:
    return np.array([rt.context_length(s) for s in sessions])


def positions(start: int, n: int) -> np.ndarray:
    return np.arange(start, start + n, dtype=np.int64)[None]


class Alone:
    """The reference: each session on a runtime of its own, one step at a time."""

    def __init__(self, art) -> None:
        self.rts = {s: runtime(art) for s in PROMPTS}
        self.held = dict.fromkeys(PROMPTS, 0)

    def step(self, session: str, ids: np.ndarray) -> np.ndarray:
        out = self.rts[session].run(session, ids, positions(self.held[session], ids.shape[1]))
        self.held[session] += ids.shape[1]
        return out


def prefill(rt: SegmentRuntime, alone: Alone) -> dict[str, np.ndarray]:
    last = {}
    for i, (session, n) in enumerate(PROMPTS.items()):
        ids = IDS[:, i:i + n]
        last[session] = rt.run(session, ids, positions(0, n))
        assert np.array_equal(last[session], alone.step(session, ids))
    return last


def test_batches_of_any_sessions_give_each_the_logits_it_gets_alone(artifacts) -> None:
    rt, alone = runtime(artifacts), Alone(artifacts)
    assert rt.batches
    last = prefill(rt, alone)
    # all four, two with a row between them (c's row runs as a dummy), out of row order, one
    for batch in (("a", "b", "c", "d"), ("a", "c"), ("d", "b", "a"), ("c",), ("a", "b", "c", "d"), ("b", "d")):
        ids = np.array([[int(last[s].argmax())] for s in batch])
        out = rt.run_batch(batch, ids, held(rt, batch))
        assert out.shape == (len(batch), 320)
        for row, session in enumerate(batch):
            expected = alone.step(session, ids[row:row + 1])
            np.testing.assert_allclose(out[row], expected[0], rtol=0, atol=1e-5)
            assert out[row].argmax() == expected[0].argmax()
            last[session] = out[row:row + 1]
    assert {s: rt.context_length(s) for s in PROMPTS} == alone.held  # dummy rows advanced nothing


def test_a_session_ended_or_recomputed_between_batches_leaves_the_others_exact(artifacts) -> None:
    rt, alone = runtime(artifacts), Alone(artifacts)
    last = prefill(rt, alone)
    rt.drop("a")  # its row goes to the session in the last row (d)
    rt.cache.truncate("b", 4)  # b recomputes from position 4 (a re-prefill, a redelivered step)
    alone.rts["b"].cache.truncate("b", 4)
    alone.held["b"] = 4
    last["b"] = rt.run("b", IDS[:, 20:21], positions(4, 1))
    assert np.array_equal(last["b"], alone.step("b", IDS[:, 20:21]))
    for _ in range(3):
        batch = ("b", "c", "d")
        ids = np.array([[int(last[s].argmax())] for s in batch])
        out = rt.run_batch(batch, ids, held(rt, batch))
        for row, session in enumerate(batch):
            np.testing.assert_allclose(out[row], alone.step(session, ids[row:row + 1])[0], rtol=0, atol=1e-5)
            last[session] = out[row:row + 1]


def test_split_segments_batch_hidden_states_as_well(artifacts) -> None:
    front, back, alone = runtime(artifacts, 0, 2), runtime(artifacts, 3), Alone(artifacts)
    last = {}
    for i, (session, n) in enumerate(PROMPTS.items()):
        last[session] = back.run(session, front.run(session, IDS[:, i:i + n], positions(0, n)), positions(0, n))
        alone.step(session, IDS[:, i:i + n])
    batch = ("d", "a", "b")
    ids = np.array([[int(last[s].argmax())] for s in batch])
    hidden = front.run_batch(batch, ids, held(front, batch))
    assert hidden.shape == (3, 1, 64)
    out = back.run_batch(batch, hidden, held(back, batch))
    for row, session in enumerate(batch):
        np.testing.assert_allclose(out[row], alone.step(session, ids[row:row + 1])[0], rtol=0, atol=1e-5)


def test_a_batch_is_refused_clearly_where_rows_would_not_be_exact(artifacts) -> None:
    _, manifest = artifacts
    rt = runtime(artifacts, manifest=dataclasses.replace(manifest, batch_rows=False))  # e.g. --quantize int8
    assert not rt.batches
    with pytest.raises(RuntimeInputError, match="cannot batch"):
        rt.run_batch(("a",), np.array([[1]]), np.array([0]))
    rt = runtime(artifacts)
    rt.run("a", IDS[:, :3], positions(0, 3))
    with pytest.raises(RuntimeInputError, match="distinct sessions"):
        rt.run_batch(("a", "a"), np.array([[1], [2]]), np.array([3, 3]))
    with pytest.raises(RuntimeInputError, match=r"shape \(2, T>=1\)"):
        rt.run_batch(("a", "b"), np.array([[1]]), np.array([3, 0]))
    rt.run("b", IDS[:, :2], positions(0, 2))
    with pytest.raises(RuntimeInputError, match="do not follow the sessions' caches"):  # b holds 2, not 0
        rt.run_batch(("a", "b"), np.array([[1], [2]]), np.array([3, 0]))
    rt.drop("b")  # a session evicted meanwhile: its step would run at position 0
    with pytest.raises(RuntimeInputError, match="do not follow"):
        rt.run_batch(("a", "b"), np.array([[1], [2]]), np.array([3, 2]))
