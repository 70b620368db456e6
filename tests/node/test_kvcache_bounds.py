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
    assert cache.reserve("a", 0, 11, ONE, np.float32, most=4096)[0].ctypes.data == key.ctypes.data  # room left: no copy
    grown, _ = cache.reserve("a", 0, FIRST_CAPACITY + 1, ONE, np.float32, most=4096)
    assert grown.shape[2] == 2 * FIRST_CAPACITY and (grown[:, :, :10] == 7.0).all()
    assert cache.nbytes() == 2 * grown.nbytes and cache.length("a", 0) == 10
    assert KVCache().reserve("b", 0, 3, ONE, np.float32, most=40)[0].shape[2] == 40  # never past max_context


def test_in_place_truncate_moves_the_end_back_without_copying() -> None:
    cache = KVCache()
    key, _ = cache.reserve("a", 0, 12, ONE, np.float32, most=4096)
    cache.advance("a", 0, 12)
    before = cache.nbytes()
    cache.truncate("a", 5)
    assert cache.length("a", 0) == 5 and cache.get("a", 0)[0].ctypes.data == key.ctypes.data and cache.nbytes() == before
    cache.truncate("a", 0)
    assert "a" not in cache and cache.nbytes() == 0


def test_in_place_growth_stops_at_the_byte_bound() -> None:
    per_position = 2 * 2 * 8 * 4  # key + value, 2 heads, head_dim 8, float32
    cache = KVCache(max_bytes=300 * per_position)
    cache.reserve("a", 0, 10, ONE, np.float32, most=4096)  # FIRST_CAPACITY positions
    grown, _ = cache.reserve("a", 0, FIRST_CAPACITY + 1, ONE, np.float32, most=4096)
    assert grown.shape[2] == 300  # doubling would pass the cap: as far as the cap goes
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


def test_in_place_sessions_are_rows_of_one_pool_kept_dense_and_freed_with_the_last() -> None:
    cache = KVCache()
    for i, session in enumerate("abcd"):
        key, _ = cache.reserve(session, 0, 5, ONE, np.float32, most=4096)
        key[0, :, :5] = i  # each session's own positions
        cache.advance(session, 0, 5)
    assert [cache.slot(s) for s in "abcd"] == [0, 1, 2, 3]
    lo, (key, _), held = cache.rows(("b", "d"), 0)  # a batch spans the rows between its sessions
    assert (lo, key.shape[0], list(held)) == (1, 3, [5, 5, 5])
    cache.drop("a")  # the session in the last row takes the free one, its positions with it
    assert cache.slot("d") == 0 and (cache.get("d", 0)[0][0, :, :5] == 3).all()
    assert (cache.get("b", 0)[0][0, :, :5] == 1).all() and (cache.get("c", 0)[0][0, :, :5] == 2).all()
    pool = cache.nbytes()
    cache.drop("b")
    cache.drop("c")  # one row of four used: the pools shrink to two rows
    assert cache.nbytes() == pool // 2 and (cache.get("d", 0)[0][0, :, :5] == 3).all()
    cache.drop("d")
    assert cache.nbytes() == 0 and cache.sessions() == ()


def test_a_pool_near_the_bound_gives_rows_what_is_left_then_evicts_the_least_recent_not_the_batch() -> None:
    per_row = 2 * 2 * 8 * 4 * FIRST_CAPACITY  # one row of one layer: key + value, 256 positions
    cache = KVCache(max_bytes=4 * per_row)
    for session in "abcd":
        cache.reserve(session, 0, 5, ONE, np.float32, most=4096)
        cache.advance(session, 0, 5)
    cache.reserve("e", 0, 5, ONE, np.float32, most=4096)  # a fifth row: shorter rows, nobody evicted
    assert set(cache.sessions()) == set("abcde") and cache.evicted == 0 and cache.nbytes() <= cache.max_bytes
    assert cache.get("e", 0)[0].shape[2] == 4 * FIRST_CAPACITY // 5  # all the positions the cap leaves
    cache.reserve_rows(("a", "e"), (0,), (300, 5), ONE, np.float32, most=4096)  # 5 x 300 do not fit: 3 rows do
    assert set(cache.sessions()) == {"a", "d", "e"} and cache.evicted == 2  # b and c, the least recent
    assert cache.nbytes() <= cache.max_bytes and cache.length("d", 0) == 5
    with pytest.raises(KVCacheFull, match="a batch of 2 sessions needs"):
        cache.reserve_rows(("a", "e"), (0,), (600, 5), ONE, np.float32, most=4096)  # 2 x 600 > 4 x 256
    assert "a" in cache and "e" in cache  # a batch that does not fit keeps its sessions: they run one by one
    assert cache.nbytes() <= cache.max_bytes


def test_pools_shrink_back_when_the_long_session_ends() -> None:
    cache = KVCache()
    cache.reserve("short", 0, 5, ONE, np.float32, most=4096)
    cache.advance("short", 0, 5)
    cache.reserve("long", 0, 1500, ONE, np.float32, most=4096)
    cache.advance("long", 0, 1500)
    grown = cache.nbytes()
    cache.drop("long")
    assert cache.nbytes() < grown / 4 and cache.length("short", 0) == 5  # not every row at 1500 positions
    cache.drop("short")
    cache.reserve("x", 0, 5, ONE, np.float32, most=4096)
    assert cache.nbytes() == 2 * 2 * 8 * 4 * FIRST_CAPACITY  # pools of one row, freed and made again
