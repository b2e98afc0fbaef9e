"""The paged KV cache: chained hashes, longest-prefix reuse, pinning, LRU eviction."""

from __future__ import annotations

import pytest

from deepinfer_engine.sim.kv_cache import KVCache, block_hashes, hash_block


def toks(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def fill(kv: KVCache, tokens: list[str]) -> list:
    """Allocate and cache the full blocks of `tokens`, as a finished prefill would."""
    hashes = block_hashes(tokens, kv.block_size)
    blocks = kv.allocate(len(hashes))
    for block, h in zip(blocks, hashes, strict=True):
        kv.cache_block(block, h)
    return blocks


def test_chained_hash_depends_on_the_whole_prefix() -> None:
    a = block_hashes(["x"] * 4 + ["y"] * 4, 4)
    b = block_hashes(["z"] * 4 + ["y"] * 4, 4)
    assert a[1] != b[1]  # same tokens in block 1, different parents
    assert block_hashes(["x"] * 4 + ["y"] * 4 + ["q"], 4) == a  # partial block ignored
    assert hash_block(a[0], ["y"] * 4) == a[1]


def test_longest_prefix_match_stops_at_first_miss() -> None:
    kv = KVCache(16, 4)
    tokens = toks("t", 12)
    blocks = fill(kv, tokens)
    kv.free(blocks)
    same = block_hashes(tokens, 4)
    assert kv.match_prefix(same) == blocks
    assert kv.match_prefix(same, max_blocks=2) == blocks[:2]
    diverging = block_hashes(tokens[:4] + toks("u", 8), 4)
    assert kv.match_prefix(diverging) == blocks[:1]


def test_pinned_blocks_are_not_evicted() -> None:
    kv = KVCache(4, 4)
    held = fill(kv, toks("a", 8))  # 2 blocks held (ref 1)
    assert kv.num_free == 2
    assert kv.usage() == pytest.approx(0.5)
    kv.allocate(2)
    assert kv.num_free == 0
    with pytest.raises(RuntimeError):
        kv.allocate(1)
    assert all(b.ref_cnt == 1 for b in held)
    assert kv.match_prefix(block_hashes(toks("a", 8), 4)) == held


def test_eviction_is_lru_and_tail_first() -> None:
    kv = KVCache(6, 4)
    a = fill(kv, toks("a", 12))  # blocks 0,1,2
    b = fill(kv, toks("b", 12))  # blocks 3,4,5
    kv.free(a)  # freed first: evicted first, and its tail before its head
    kv.free(b)
    assert kv.free_order() == [a[2].id, a[1].id, a[0].id, b[2].id, b[1].id, b[0].id]
    kv.allocate(1)
    # a's last block went; a's first two blocks are still a usable prefix
    assert kv.match_prefix(block_hashes(toks("a", 12), 4)) == a[:2]
    assert kv.evictions == 1
    kv.allocate(3)
    assert kv.match_prefix(block_hashes(toks("a", 12), 4)) == []
    assert kv.match_prefix(block_hashes(toks("b", 12), 4)) == b[:2]


def test_hit_moves_blocks_out_of_the_free_queue_and_back_as_most_recent() -> None:
    kv = KVCache(4, 4)
    a = fill(kv, toks("a", 8))
    b = fill(kv, toks("b", 8))
    kv.free(a)
    kv.free(b)
    hit = kv.match_prefix(block_hashes(toks("a", 8), 4))
    assert not kv.can_allocate(3, hit)  # 4 free, but 2 of them are the hit
    assert kv.can_allocate(2, hit)
    kv.touch(hit)
    assert kv.num_free == 2
    kv.free(hit)  # a is now the most recently used
    assert kv.free_order()[-2:] == [a[1].id, a[0].id]


def test_shared_blocks_count_references() -> None:
    kv = KVCache(4, 4)
    a = fill(kv, toks("a", 8))
    hit = kv.match_prefix(block_hashes(toks("a", 8), 4))
    kv.touch(hit)  # a second request shares the prefix
    kv.free(a)
    assert kv.num_free == 2  # still held by the second request
    kv.free(hit)
    assert kv.num_free == 4
