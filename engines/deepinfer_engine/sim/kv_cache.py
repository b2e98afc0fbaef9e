"""vLLM's paged KV cache with automatic prefix caching, as a pure data structure.

Follows vLLM V1's `BlockPool` / `KVCacheManager`:
- the cache is `num_blocks` blocks of `block_size` tokens;
- a full block is identified by a chained hash: hash(parent block's hash, the block's
  tokens), so equal hashes mean equal prefixes up to and including that block;
- a new request reuses the longest chain of cached blocks from its first block on;
- a block with a reference count above zero (held by a running request) is pinned;
- free blocks sit in one queue, least recently used first; allocation takes blocks from
  the front and evicts whatever prefix they cached. A finished request frees its blocks
  tail first, so the end of a sequence is evicted before its (more shareable) start.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import xxhash

from .kv_events import Removed, SimEvent, Stored

# Seed of every chain (vLLM's NONE_HASH); any constant works within one engine.
ROOT_HASH = 0x5EED_DEE9_1F00


def hash_block(parent: int, tokens: Sequence[str]) -> int:
    """Chained block hash: covers the parent chain and this block's tokens."""
    return xxhash.xxh3_64_intdigest("\x1f".join(tokens).encode(), seed=parent)


def block_hashes(tokens: Sequence[str], block_size: int, parent: int = ROOT_HASH) -> list[int]:
    """Hashes of every full block of `tokens`, chained from `parent`."""
    out: list[int] = []
    for start in range(0, len(tokens) - block_size + 1, block_size):
        parent = hash_block(parent, tokens[start : start + block_size])
        out.append(parent)
    return out


class Block:
    __slots__ = ("block_hash", "id", "ref_cnt")

    def __init__(self, block_id: int) -> None:
        self.id = block_id
        self.ref_cnt = 0
        self.block_hash: int | None = None

    def __repr__(self) -> str:
        return f"Block({self.id}, ref={self.ref_cnt}, hash={self.block_hash})"


class KVCache:
    """Block pool with prefix caching. All operations are O(blocks touched)."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks in eviction order (first = least recently used); an OrderedDict gives
        # O(1) removal from the middle when a cached free block is hit again.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, Block] = {}
        self.evictions = 0
        # Where the cache reports what it starts and stops caching (kv_events.py), for
        # an engine that publishes KV events; None: nobody listens.
        self.events: list[SimEvent] | None = None

    # --- views -------------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks not held by any request (empty or evictable cached ones)."""
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def usage(self) -> float:
        """vLLM's kv_cache_usage_perc: share of blocks held by requests (0..1)."""
        return 1.0 - len(self._free) / self.num_blocks

    def free_order(self) -> list[int]:
        """Free block ids, next to be evicted first (for tests and debugging)."""
        return list(self._free)

    def is_cached(self, block_hash: int) -> bool:
        return block_hash in self._cached

    # --- prefix lookup -----------------------------------------------------------------
    def match_prefix(self, hashes: Sequence[int], max_blocks: int | None = None) -> list[Block]:
        """The longest chain of cached blocks for `hashes`, without touching them."""
        limit = len(hashes) if max_blocks is None else min(max_blocks, len(hashes))
        hit: list[Block] = []
        cached = self._cached
        for i in range(limit):
            block = cached.get(hashes[i])
            if block is None:
                break
            hit.append(block)
        return hit

    # --- allocation --------------------------------------------------------------------
    def can_allocate(self, n_new: int, hit: Sequence[Block] = ()) -> bool:
        """Whether `n_new` fresh blocks fit once `hit` (about to be pinned) is taken out of
        the free queue (vLLM subtracts evictable computed blocks the same way)."""
        evictable_hits = sum(1 for b in hit if b.ref_cnt == 0)
        return n_new <= len(self._free) - evictable_hits

    def touch(self, blocks: Sequence[Block]) -> None:
        """Pin cached blocks for a request: take free ones out of the eviction queue."""
        free = self._free
        for block in blocks:
            if block.ref_cnt == 0:
                del free[block.id]
            block.ref_cnt += 1

    def allocate(self, n: int) -> list[Block]:
        """Take `n` blocks from the front of the free queue, evicting their cached prefix."""
        if n > len(self._free):
            raise RuntimeError(f"cannot allocate {n} blocks, {len(self._free)} free")
        out: list[Block] = []
        free, cached, blocks = self._free, self._cached, self.blocks
        for _ in range(n):
            block_id, _unused = free.popitem(last=False)
            block = blocks[block_id]
            if block.block_hash is not None:
                if cached.get(block.block_hash) is block:
                    del cached[block.block_hash]
                    self.evictions += 1
                    if self.events is not None:
                        self.events.append(Removed(block.block_hash))
                block.block_hash = None
            block.ref_cnt = 1
            out.append(block)
        return out

    def cache_block(self, block: Block, block_hash: int, parent_hash: int | None = None,
                    token_ids: Sequence[int] = ()) -> None:
        """A block just became full: make it findable by its chained hash. When another
        block already caches the same prefix, the first one stays the cached copy.
        `parent_hash` (None for a first block) and `token_ids` go into the event."""
        if block.block_hash is not None:
            return
        block.block_hash = block_hash
        if self._cached.setdefault(block_hash, block) is block and self.events is not None:
            self.events.append(Stored(block_hash, parent_hash, tuple(token_ids)))

    def free(self, blocks: Sequence[Block]) -> None:
        """Release a request's blocks, tail first: the tail is evicted before the head."""
        free = self._free
        for block in reversed(blocks):
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                free[block.id] = None
