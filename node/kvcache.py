"""Per-session, per-layer KV cache of a node, bounded in bytes and in idle time.

Two layouts, by the layer's export: *concatenated*, keys and values are the arrays the
layer returns, shape (1, kv_heads, positions, head_dim), and a step replaces them with the
longer `present` arrays (`put`); *in place* (rotary families), a pool per layer, arrays of
shape (slots, kv_heads, capacity, head_dim) that the layer writes into: a session owns one
slot, the same row in every layer (`reserve`, then `advance`). A step of one session binds
its row, a batch of sessions binds the rows from the lowest of their slots to the highest
(`rows`): ONNX Runtime's GroupQueryAttention takes past keys as one (batch, ...) tensor,
and rows of one array are one tensor without a copy. Slots stay dense (a session ended
gives its slot to the last one), so a batch's span holds few rows that are not in it.

The pools grow by doubling (capacity up to the model's max_context, slots as sessions
come), so a step copies nothing but its own new positions; bytes count what is allocated.
Over ``max_bytes`` the least recently used sessions are evicted; sessions idle for
``ttl_s`` are dropped by ``expire``. An evicted session is not lost: its next step is
answered `unknown_session` and the head re-prefills it from its token history. A session
that cannot fit even alone is dropped and ``KVCacheFull`` names the cap (the node answers
`too_large`).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence

import numpy as np

from linguamq.node.errors import NodeError

KV = tuple[np.ndarray, np.ndarray]


class KVCacheFull(NodeError):
    """One session's KV cache alone exceeds the cache's bound."""


# Positions an in-place pool first holds: a chat turn fits; it then doubles.
FIRST_CAPACITY = 256


class KVCache:
    def __init__(self, *, max_bytes: int = 0, ttl_s: float = 0.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """``max_bytes`` 0 and ``ttl_s`` 0: no bound."""
        self._used: OrderedDict[str, float] = OrderedDict()  # every session, least recently used first
        self._store: dict[str, dict[int, KV]] = {}  # concatenated layout
        self._bytes: dict[str, int] = {}  # concatenated layout
        self._concat_total = 0
        # In-place layout: one pool per layer, a slot per session, positions held per layer.
        self._pools: dict[int, KV] = {}
        self._slots: dict[str, int] = {}
        self._lengths: dict[str, dict[int, int]] = {}
        self._row: tuple[tuple[int, int], np.dtype] | None = None  # (kv heads, head dim), dtype of every pool
        self._capacity = 0
        self._nslots = 0
        self.max_bytes, self.ttl_s, self._clock = max_bytes, ttl_s, clock
        self.evicted = 0  # sessions dropped by the bounds, since start

    # --- concatenated layout ------------------------------------------------------------

    def get(self, session: str, layer: int) -> KV | None:
        """(key, value) cached for this session and layer (the layer's index in the model);
        in place, the session's row of the layer's pool, (1, kv, capacity, D)."""
        if session in self._slots:
            if layer not in self._pools:
                return None
            slot = self._slots[session]
            key, value = self._pools[layer]
            return key[slot:slot + 1], value[slot:slot + 1]
        return self._store.get(session, {}).get(layer)

    def put(self, session: str, layer: int, key: np.ndarray, value: np.ndarray) -> None:
        """Concatenated layout: the layer's present key and value replace the cached ones."""
        layers = self._store.setdefault(session, {})
        old = layers.get(layer)
        delta = key.nbytes + value.nbytes - (old[0].nbytes + old[1].nbytes if old else 0)
        self._bytes[session] = self._bytes.get(session, 0) + delta
        self._concat_total += delta
        layers[layer] = (key, value)
        if self.max_bytes and self._bytes[session] > self.max_bytes:
            need = self._bytes[session]
            self.drop(session)  # some layers advanced, others not: the session's cache is unusable
            raise self._full(session, need)
        self._touch(session)
        self._evict_over_budget(keep=(session,))

    # --- in-place layout ------------------------------------------------------------------

    def reserve(self, session: str, layer: int, positions: int, shape: tuple[int, int, int, int],
                dtype: type | np.dtype, *, most: int) -> KV:
        """In-place layout: the session's row of ``layer``'s pool, with room for
        ``positions`` (the pools grown by doubling up to ``most``, what they hold copied over);
        ``shape`` is that of one position of one row. The caller writes into it, then calls
        `advance`."""
        self.reserve_rows((session,), (layer,), (positions,), shape, dtype, most=most)
        got = self.get(session, layer)
        assert got is not None
        return got

    def reserve_rows(self, sessions: Sequence[str], layers: Iterable[int], positions: Sequence[int],
                     shape: tuple[int, int, int, int], dtype: type | np.dtype, *, most: int) -> None:
        """Slots for ``sessions`` in the pools of ``layers``, each with room for its
        ``positions`` (and one more for every row that is not in the batch but lies in its
        span: a row run beside others writes its next position, which it does not hold yet).
        None of ``sessions`` is evicted for the others' room."""
        row = ((shape[1], shape[3]), np.dtype(dtype))
        if self._slots and self._row != row:
            raise ValueError(f"in-place KV of shape {row} beside pools of {self._row}")
        self._row = row  # kept when the pools empty: eviction below counts bytes by it
        layers = tuple(layers)
        needed = max(max(positions), 1 + max((self._held(s) for s in self._slots), default=0))
        new = [s for s in sessions if s not in self._slots]
        slots = len(self._slots) + len(new)
        capacity = self._capacity
        if needed > capacity:
            capacity = max(needed, min(max(2 * capacity, FIRST_CAPACITY), most))
        nslots = max(self._nslots, _pow2(slots))
        n_layers = len(set(self._pools) | set(layers))
        if self.max_bytes and self._pool_bytes(n_layers, nslots, capacity) + self._concat_total > self.max_bytes:
            nslots, capacity = self._fit(sessions, n_layers, max(positions), target=capacity)
        if (nslots, capacity) != (self._nslots, self._capacity):
            self._reallocate(nslots, capacity)
        for layer in layers:
            if layer not in self._pools:
                self._pools[layer] = tuple(np.zeros((self._nslots, *row[0][:1], self._capacity, row[0][1]), row[1])
                                           for _ in range(2))  # type: ignore[assignment]
        for session in sessions:
            if session not in self._slots:
                self._slots[session] = len(self._slots)
                self._lengths[session] = {}
            held = self._lengths[session]
            for layer in layers:
                held.setdefault(layer, 0)
            self._touch(session)

    def rows(self, sessions: Sequence[str], layer: int) -> tuple[int, KV, np.ndarray]:
        """A batch's rows of ``layer``: (the first slot, the pools' rows from the lowest of
        the sessions' slots to the highest, each row's positions held). Rows that are not
        in the batch run too, their outputs discarded; their next position is written, and
        overwritten by their own next step."""
        slots = [self._slots[s] for s in sessions]
        lo, hi = min(slots), max(slots) + 1
        key, value = self._pools[layer]
        by_slot = {slot: session for session, slot in self._slots.items()}
        held = np.array([self._lengths[by_slot[i]].get(layer, 0) for i in range(lo, hi)], np.int64)
        return lo, (key[lo:hi], value[lo:hi]), held

    def slot(self, session: str) -> int:
        return self._slots[session]

    def advance(self, session: str, layer: int, length: int) -> None:
        """In-place layout: the layer's row now holds ``length`` positions."""
        if session in self._lengths:
            self._lengths[session][layer] = length

    def _held(self, session: str) -> int:
        return max(self._lengths[session].values(), default=0)

    def _pool_bytes(self, layers: int, slots: int, capacity: int) -> int:
        if self._row is None:
            return 0
        (heads, dim), dtype = self._row
        return 2 * layers * slots * heads * capacity * dim * dtype.itemsize

    def _reallocate(self, nslots: int, capacity: int) -> None:
        """Pools of ``nslots`` rows of ``capacity`` positions, the used rows (0..n-1, dense)
        and the positions they hold copied over."""
        keep, held = len(self._slots), min(self._capacity, capacity)
        for layer, old in list(self._pools.items()):
            new = tuple(np.zeros((nslots, a.shape[1], capacity, a.shape[3]), a.dtype) for a in old)
            for src, dst in zip(old, new):
                dst[:keep, :, :held] = src[:keep, :, :held]
            self._pools[layer] = new  # type: ignore[assignment]
        self._nslots, self._capacity = nslots, capacity

    def _fit(self, sessions: Sequence[str], layers: int, positions: int, *, target: int) -> tuple[int, int]:
        """(rows, capacity) under ``max_bytes`` near the cap: exactly the rows in use, and as
        many positions as the cap leaves (up to ``target``), at least what the sessions hold
        and ``positions``; the least recently used sessions but ``sessions`` are evicted
        until that fits. Nothing fits: KVCacheFull (a lone session is dropped, a batch's are
        kept: they may fit one at a time)."""
        new = [s for s in sessions if s not in self._slots]
        while True:
            slots = len(self._slots) + len(new)
            needed = max(positions, 1 + max((self._held(s) for s in self._slots), default=0))
            per_position = self._pool_bytes(layers, slots, 1)
            capacity = max(needed, min(target, (self.max_bytes - self._concat_total) // max(per_position, 1)))
            if self._pool_bytes(layers, slots, capacity) + self._concat_total <= self.max_bytes:
                return slots, capacity
            if not self._evict_one(keep=sessions):
                break
        need = self._pool_bytes(layers, len(sessions), positions)
        if len(sessions) > 1:  # a batch: its sessions may still fit one at a time
            raise KVCacheFull(f"a batch of {len(sessions)} sessions needs {need / 2**20:.2f} MiB of KV cache, more "
                              f"than the cap of {self.max_bytes / 2**20:.2f} MiB (--kv-max-mb)")
        self.drop(sessions[0])  # some layers may have advanced: the session's cache is unusable
        raise self._full(sessions[0], need)

    # --- every layout ---------------------------------------------------------------------

    def _touch(self, session: str) -> None:
        self._used[session] = self._clock()
        self._used.move_to_end(session)

    def length(self, session: str, layer: int) -> int:
        """Positions cached for this session and layer (0 when none)."""
        if session in self._lengths:
            return self._lengths[session].get(layer, 0)
        kv = self._store.get(session, {}).get(layer)
        return 0 if kv is None else int(kv[0].shape[2])

    def truncate(self, session: str, length: int) -> None:
        """Keep only the first `length` positions of every layer (a step to be recomputed,
        a re-prefill from there); 0 forgets the session."""
        if length <= 0:
            return self.drop(session)
        if session in self._lengths:  # the positions past `length` are overwritten by the next step
            held = self._lengths[session]
            for layer in held:
                held[layer] = min(held[layer], length)
            return None
        layers = self._store.get(session, {})
        for layer, (key, value) in layers.items():
            if key.shape[2] > length:  # copies: ONNX Runtime wants contiguous inputs
                cut = (key[:, :, :length].copy(), value[:, :, :length].copy())
                delta = cut[0].nbytes + cut[1].nbytes - key.nbytes - value.nbytes
                self._bytes[session] += delta
                self._concat_total += delta
                layers[layer] = cut
        return None

    def drop(self, session: str) -> None:
        """Forget a session (finished, cancelled or to be re-prefilled); unknown ids are fine.
        An in-place session's slot goes to the session in the last slot (its rows copied),
        and the pools shrink to a quarter of their slots when as few are used."""
        self._used.pop(session, None)
        self._store.pop(session, None)
        self._concat_total -= self._bytes.pop(session, 0)
        slot = self._slots.pop(session, None)
        self._lengths.pop(session, None)
        if slot is None:
            return
        last = len(self._slots)
        if slot != last:
            moved = next(s for s, i in self._slots.items() if i == last)
            held = self._held(moved)
            for key, value in self._pools.values():
                key[slot, :, :held], value[slot, :, :held] = key[last, :, :held], value[last, :, :held]
            self._slots[moved] = slot
        if not self._slots:
            self._pools.clear()
            self._nslots = self._capacity = 0
            return
        # Shrink what a quarter fills: rows to half, positions to twice the longest session's.
        nslots = self._nslots // 2 if len(self._slots) <= self._nslots // 4 else self._nslots
        longest = 1 + max(self._held(s) for s in self._slots)
        capacity = max(2 * longest, FIRST_CAPACITY) if longest <= self._capacity // 4 else self._capacity
        if (nslots, capacity) != (self._nslots, self._capacity):
            self._reallocate(nslots, min(capacity, self._capacity))

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
        return session in self._used

    def sessions(self) -> tuple[str, ...]:
        return tuple(self._used)

    def nbytes(self, session: str | None = None) -> int:
        """Bytes held for one session (in place: its row of every pool), or for all of them."""
        if session is None:
            return self._concat_total + self._pool_bytes(len(self._pools), self._nslots, self._capacity)
        if session in self._slots:
            return self._pool_bytes(len(self._pools), 1, self._capacity)
        return self._bytes.get(session, 0)

    def _full(self, session: str, need: int) -> KVCacheFull:
        return KVCacheFull(f"session {session} needs {need / 2**20:.2f} MiB of KV cache, more than the cap of "
                           f"{self.max_bytes / 2**20:.2f} MiB (--kv-max-mb): shorten the prompt or max_tokens")

    def _evict_over_budget(self, *, keep: Sequence[str]) -> None:
        while self.max_bytes and self.nbytes() > self.max_bytes and self._evict_one(keep=keep):
            pass

    def _evict_one(self, *, keep: Sequence[str]) -> bool:
        """Drop the least recently used session not in ``keep``; False when there is none."""
        victim = next((s for s in self._used if s not in keep), None)
        if victim is None:
            return False
        self.drop(victim)
        self.evicted += 1
        return True


def _pow2(n: int) -> int:
    """The power of two at least ``n`` (1 for 0)."""
    return 1 << max(n - 1, 0).bit_length()
