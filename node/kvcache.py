"""Per-session, per-layer KV cache of a node, bounded in bytes and in idle time.

Two layouts, by the layer's export: *concatenated*, keys and values are the arrays the
layer returns, shape (1, kv_heads, positions, head_dim), and a step replaces them with the
longer `present` arrays (`put`); *in place* (rotary families), a buffer of some capacity
that the layer writes into (`reserve`, then `advance`): it grows by doubling, so a step
copies nothing but its own new positions. Bytes count capacity. Over ``max_bytes`` the least recently used sessions are evicted; sessions idle
for ``ttl_s`` are dropped by ``expire``. An evicted session is not lost: its next step
is answered `unknown_session` and the head re-prefills it from its token history. A
session whose cache alone exceeds ``max_bytes`` cannot be helped by evicting others: it
is dropped and ``KVCacheFull`` names the cap (the node answers `too_large`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

import numpy as np

from linguamq.node.errors import NodeError

KV = tuple[np.ndarray, np.ndarray]


class KVCacheFull(NodeError):
    """One session's KV cache alone exceeds the cache's bound."""


# Positions a new in-place buffer holds: a chat turn fits; it then doubles.
FIRST_CAPACITY = 256


class KVCache:
    def __init__(self, *, max_bytes: int = 0, ttl_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``max_bytes`` 0 and ``ttl_s`` 0: no bound."""
        self._store: OrderedDict[str, dict[int, KV]] = OrderedDict()  # least recently used first
        self._lengths: dict[str, dict[int, int]] = {}  # positions held, for in-place buffers only
        self._targets: dict[str, int] = {}  # the capacity a session's in-place buffers grow to
        self._used: dict[str, float] = {}
        self._bytes: dict[str, int] = {}
        self._total = 0
        self.max_bytes, self.ttl_s, self._clock = max_bytes, ttl_s, clock
        self.evicted = 0  # sessions dropped by the bounds, since start

    def get(self, session: str, layer: int) -> KV | None:
        """(key, value) cached for this session and layer (the layer's index in the model)."""
        return self._store.get(session, {}).get(layer)

    def put(self, session: str, layer: int, key: np.ndarray, value: np.ndarray) -> None:
        """Concatenated layout: the layer's present key and value replace the cached ones."""
        self._replace(session, layer, key, value)
        self._touch(session)

    def reserve(self, session: str, layer: int, positions: int, shape: tuple[int, int, int, int],
                dtype: type | np.dtype, *, most: int) -> KV:
        """In-place layout: the session's buffers for ``layer``, with room for ``positions``
        (grown by doubling up to ``most``, the held positions copied over); ``shape`` is that
        of a buffer of one position. The caller writes into them, then calls `advance`."""
        lengths = self._lengths.setdefault(session, {})
        old = self.get(session, layer)
        capacity = 0 if old is None else old[0].shape[2]
        if positions > capacity:
            per_position = 2 * int(np.prod(shape)) * np.dtype(dtype).itemsize
            grown = max(positions, self._target(session, positions, per_position, most))
            if self.max_bytes and self._bytes.get(session, 0) + (grown - capacity) * per_position > self.max_bytes:
                grown = self._targets[session] = positions  # near the cap: what is needed, the cap checks that
            key, value = (np.zeros((*shape[:2], grown, shape[3]), dtype) for _ in range(2))
            held = lengths.get(layer, 0)
            if old is not None:
                key[:, :, :held], value[:, :, :held] = old[0][:, :, :held], old[1][:, :, :held]
            self._replace(session, layer, key, value)
            lengths[layer] = held
        self._touch(session)
        return self._store[session][layer]

    def _target(self, session: str, positions: int, per_position: int, most: int) -> int:
        """The capacity every layer of the session grows to: doubled while the whole session,
        every layer doubled, stays under the cap (doubling layer by layer spent the cap on the
        first layers' empty room, and a session that fitted was refused)."""
        target = self._targets.get(session, 0)
        if positions > target:
            layers = max(len(self._store.get(session, {})), 1)
            target = max(positions, min(max(2 * target, FIRST_CAPACITY), most))
            if self.max_bytes and layers * target * per_position > self.max_bytes:
                target = positions
            self._targets[session] = target
        return target

    def advance(self, session: str, layer: int, length: int) -> None:
        """In-place layout: the layer's buffer now holds ``length`` positions."""
        if session in self._store:
            self._lengths.setdefault(session, {})[layer] = length

    def _replace(self, session: str, layer: int, key: np.ndarray, value: np.ndarray) -> None:
        layers = self._store.setdefault(session, {})
        old = layers.get(layer)
        self._account(session, key.nbytes + value.nbytes - (old[0].nbytes + old[1].nbytes if old else 0))
        layers[layer] = (key, value)
        if self.max_bytes and self._bytes[session] > self.max_bytes:
            need = self._bytes[session]
            self.drop(session)  # some layers advanced, others not: the session's cache is unusable
            raise KVCacheFull(f"session {session} needs {need / 2**20:.2f} MiB of KV cache, more than the cap of "
                              f"{self.max_bytes / 2**20:.2f} MiB (--kv-max-mb): shorten the prompt or max_tokens")

    def _touch(self, session: str) -> None:
        self._store.move_to_end(session)
        self._used[session] = self._clock()
        self._evict_over_budget(keep=session)

    def length(self, session: str, layer: int) -> int:
        """Positions cached for this session and layer (0 when none)."""
        kv = self.get(session, layer)
        if kv is None:
            return 0
        in_place = self._lengths.get(session, {}).get(layer)
        return int(kv[0].shape[2]) if in_place is None else in_place

    def truncate(self, session: str, length: int) -> None:
        """Keep only the first `length` positions of every layer (a step to be recomputed,
        a re-prefill from there); 0 forgets the session."""
        if length <= 0:
            return self.drop(session)
        layers, in_place = self._store.get(session, {}), self._lengths.get(session, {})
        for layer, (key, value) in layers.items():
            if layer in in_place:  # the positions past `length` are overwritten by the next step
                in_place[layer] = min(in_place[layer], length)
            elif key.shape[2] > length:  # copies: ONNX Runtime wants contiguous inputs
                cut = (key[:, :, :length].copy(), value[:, :, :length].copy())
                self._account(session, cut[0].nbytes + cut[1].nbytes - key.nbytes - value.nbytes)
                layers[layer] = cut
        return None

    def drop(self, session: str) -> None:
        """Forget a session (finished, cancelled or to be re-prefilled); unknown ids are fine."""
        self._store.pop(session, None)
        self._lengths.pop(session, None)
        self._targets.pop(session, None)
        self._used.pop(session, None)
        self._total -= self._bytes.pop(session, 0)

    def expire(self) -> list[str]:
        """Drop the sessions idle for longer than ``ttl_s``; returns them."""
        if not self.ttl_s:
            return []
        cutoff = self._clock() - self.ttl_s
        idle = [s for s, used in self._used.items() if used < cutoff]
        for session in idle:
            self.drop(session)
        self.evicted += len(idle)
        return idle

    def __contains__(self, session: str) -> bool:
        return session in self._store

    def sessions(self) -> tuple[str, ...]:
        return tuple(self._store)

    def nbytes(self, session: str | None = None) -> int:
        """Bytes held for one session, or for all of them."""
        return self._total if session is None else self._bytes.get(session, 0)

    def _account(self, session: str, delta: int) -> None:
        self._bytes[session] = self._bytes.get(session, 0) + delta
        self._total += delta

    def _evict_over_budget(self, *, keep: str) -> None:
        while self.max_bytes and self._total > self.max_bytes and len(self._store) > 1:
            oldest = next(s for s in self._store if s != keep)
            self.drop(oldest)
            self.evicted += 1
