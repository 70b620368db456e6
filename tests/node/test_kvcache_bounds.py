"""The KV cache: LRU eviction past max_bytes, expiry after ttl_s, and the in-place buffers."""

from __future__ import annotations

import numpy as np
import pytest

from linguamq.node.kvcache import FIRST_CAPACITY, KVCache, KVCacheFull


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


ONE = (1, 2, 1, 8)  # a buffer of one position: kv heads 2, head_dim 8


def test_in_place_buffers_grow_by_doubling_keep_what_they_hold_and_count_their_capacity() -> None:
    cache = KVCache()
    key, value = cache.reserve("a", 0, 10, ONE, np.float32, most=4096)
    assert key.shape == (1, 2, FIRST_CAPACITY, 8) and cache.length("a", 0) == 0
    key[:, :, :10] = 7.0
    cache.advance("a", 0, 10)
    assert cache.reserve("a", 0, 11, ONE, np.float32, most=4096)[0] is key  # room left: the same buffer, no copy
    grown, _ = cache.reserve("a", 0, FIRST_CAPACITY + 1, ONE, np.float32, most=4096)
    assert grown.shape[2] == 2 * FIRST_CAPACITY and (grown[:, :, :10] == 7.0).all()
    assert cache.nbytes() == 2 * grown.nbytes and cache.length("a", 0) == 10
    assert cache.reserve("b", 0, 3, ONE, np.float32, most=40)[0].shape[2] == 40  # never past max_context


def test_in_place_truncate_moves_the_end_back_without_copying() -> None:
    cache = KVCache()
    key, _ = cache.reserve("a", 0, 12, ONE, np.float32, most=4096)
    cache.advance("a", 0, 12)
    before = cache.nbytes()
    cache.truncate("a", 5)
    assert cache.length("a", 0) == 5 and cache.get("a", 0)[0] is key and cache.nbytes() == before
    cache.truncate("a", 0)
    assert "a" not in cache and cache.nbytes() == 0


def test_in_place_growth_stops_at_the_byte_bound() -> None:
    per_position = 2 * 2 * 8 * 4  # key + value, 2 heads, head_dim 8, float32
    cache = KVCache(max_bytes=300 * per_position)
    cache.reserve("a", 0, 10, ONE, np.float32, most=4096)  # FIRST_CAPACITY positions
    grown, _ = cache.reserve("a", 0, FIRST_CAPACITY + 1, ONE, np.float32, most=4096)
    assert grown.shape[2] == FIRST_CAPACITY + 1  # doubling would pass the cap: just what is needed
    with pytest.raises(KVCacheFull, match="session a needs"):
        cache.reserve("a", 0, 301, ONE, np.float32, most=4096)
    assert "a" not in cache


def test_a_session_under_the_bound_is_never_refused_for_the_room_its_buffers_grew() -> None:
    per_position = 2 * 2 * 8 * 4
    cache = KVCache(max_bytes=30 * 300 * per_position)  # 30 layers of 300 positions fit
    for layer in range(30):
        cache.reserve("a", layer, 10, ONE, np.float32, most=4096)  # FIRST_CAPACITY each
        cache.advance("a", layer, 10)
    for length in range(FIRST_CAPACITY + 1, 300):  # past the first capacity, one step at a time
        for layer in range(30):  # every layer doubled would pass the bound
            cache.reserve("a", layer, length, ONE, np.float32, most=4096)
            cache.advance("a", layer, length)
    assert "a" in cache and cache.length("a", 29) == 299 and cache.nbytes("a") <= cache.max_bytes
