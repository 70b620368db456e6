"""Per-session, per-layer KV cache of a node.

Keys and values are kept as the arrays the layer pieces return, shape
(1, kv_heads, positions, head_dim); a step replaces them with the longer `present`
arrays. Memory bounds and expiry come later; `nbytes` is there so they can.
"""

from __future__ import annotations

import numpy as np

KV = tuple[np.ndarray, np.ndarray]


class KVCache:
    def __init__(self) -> None:
        self._store: dict[str, dict[int, KV]] = {}

    def get(self, session: str, layer: int) -> KV | None:
        """(key, value) cached for this session and layer (the layer's index in the model)."""
        return self._store.get(session, {}).get(layer)

    def put(self, session: str, layer: int, key: np.ndarray, value: np.ndarray) -> None:
        self._store.setdefault(session, {})[layer] = (key, value)

    def length(self, session: str, layer: int) -> int:
        """Positions cached for this session and layer (0 when none)."""
        kv = self.get(session, layer)
        return 0 if kv is None else int(kv[0].shape[2])

    def truncate(self, session: str, length: int) -> None:
        """Keep only the first `length` positions of every layer (a step to be recomputed,
        a re-prefill from there); 0 forgets the session."""
        if length <= 0:
            return self.drop(session)
        layers = self._store.get(session, {})
        for layer, (key, value) in layers.items():
            if key.shape[2] > length:  # copies: ONNX Runtime wants contiguous inputs
                layers[layer] = (key[:, :, :length].copy(), value[:, :, :length].copy())
        return None

    def drop(self, session: str) -> None:
        """Forget a session (finished, cancelled or to be re-prefilled); unknown ids are fine."""
        self._store.pop(session, None)

    def sessions(self) -> tuple[str, ...]:
        return tuple(self._store)

    def nbytes(self, session: str | None = None) -> int:
        """Bytes held for one session, or for all of them."""
        stores = [self._store.get(session, {})] if session is not None else list(self._store.values())
        return sum(k.nbytes + v.nbytes for layers in stores for k, v in layers.values())
