"""KVCache: per session, per layer; drop forgets one session only."""

from __future__ import annotations

import numpy as np

from linguamq.node.kvcache import KVCache


def kv(positions: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((1, 2, positions, 4), np.float32), np.ones((1, 2, positions, 4), np.float32)


def test_put_get_length_drop() -> None:
    cache = KVCache()
    assert cache.get("a", 0) is None and cache.length("a", 0) == 0
    cache.put("a", 0, *kv(3))
    cache.put("a", 1, *kv(3))
    cache.put("b", 0, *kv(5))
    assert cache.length("a", 1) == 3 and cache.length("b", 0) == 5
    assert np.array_equal(cache.get("a", 0)[1], kv(3)[1])
    assert cache.nbytes("a") == 2 * 2 * (2 * 3 * 4 * 4) and cache.nbytes() == cache.nbytes("a") + 2 * (2 * 5 * 4 * 4)
    cache.drop("a")
    cache.drop("never-seen")
    assert cache.sessions() == ("b",) and cache.get("a", 0) is None and cache.length("b", 0) == 5


def test_put_replaces_the_layer_entry() -> None:
    cache = KVCache()
    cache.put("s", 2, *kv(3))
    cache.put("s", 2, *kv(4))
    assert cache.length("s", 2) == 4 and cache.nbytes("s") == 2 * (2 * 4 * 4 * 4)


def test_truncate_keeps_a_prefix_of_every_layer() -> None:
    cache = KVCache()
    key = np.arange(1 * 2 * 6 * 4, dtype=np.float32).reshape(1, 2, 6, 4)
    cache.put("s", 0, key, key + 1)
    cache.put("s", 1, key[:, :, :3].copy(), key[:, :, :3].copy())
    cache.truncate("s", 4)
    k, v = cache.get("s", 0)
    assert k.shape == (1, 2, 4, 4) and k.flags.c_contiguous and np.array_equal(v, key[:, :, :4] + 1)
    assert cache.length("s", 1) == 3  # shorter layers are left alone
    cache.truncate("s", 0)
    assert cache.sessions() == ()
