"""The KV cache's bounds: LRU eviction past max_bytes, expiry after ttl_s."""

from __future__ import annotations

import numpy as np
import pytest

from linguamq.node.kvcache import KVCache, KVCacheFull


def kv(positions: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((1, 2, positions, 8), np.float32), np.zeros((1, 2, positions, 8), np.float32)


def test_least_recently_used_sessions_are_evicted_past_the_byte_bound() -> None:
    one = sum(a.nbytes for a in kv(10))
    cache = KVCache(max_bytes=2 * one)
    cache.put("a", 0, *kv(10))
    cache.put("b", 0, *kv(10))
    cache.put("a", 0, *kv(10))  # a used again: b is now the least recent
    cache.put("c", 0, *kv(10))
    assert set(cache.sessions()) == {"a", "c"}
    assert cache.nbytes() == 2 * one and cache.evicted == 1


def test_a_session_alone_over_the_bound_is_refused_clearly_and_the_others_kept() -> None:
    one = sum(a.nbytes for a in kv(10))
    cache = KVCache(max_bytes=2 * one)
    cache.put("small", 0, *kv(10))
    with pytest.raises(KVCacheFull, match=r"session big needs .* MiB of KV cache, more than the cap"):
        cache.put("big", 0, *kv(100))
    assert cache.sessions() == ("small",) and cache.evicted == 0 and cache.nbytes() == one


def test_byte_accounting_follows_replace_truncate_and_drop() -> None:
    cache = KVCache()
    cache.put("a", 0, *kv(10))
    cache.put("a", 0, *kv(12))  # a step replaces the layer's arrays
    cache.put("a", 1, *kv(12))
    assert cache.nbytes("a") == cache.nbytes() == 2 * sum(x.nbytes for x in kv(12))
    cache.truncate("a", 5)
    assert cache.nbytes() == 2 * sum(x.nbytes for x in kv(5)) and cache.length("a", 1) == 5
    cache.drop("a")
    assert cache.nbytes() == 0 and cache.sessions() == ()


def test_idle_sessions_expire() -> None:
    now = [100.0]
    cache = KVCache(ttl_s=30, clock=lambda: now[0])
    cache.put("old", 0, *kv(4))
    now[0] += 20
    cache.put("fresh", 0, *kv(4))
    now[0] += 15
    assert cache.expire() == ["old"]
    assert cache.sessions() == ("fresh",) and cache.evicted == 1
