"""Which prompt prefixes each engine probably still holds in its KV cache.

The estimate is what the router sent there: every chain hash (see features.py) of every
request routed to an engine, in a per-engine LRU sized like the engine's KV cache
(capacity in characters / chunk characters). A global map hash -> engines holding it
answers "who holds this prefix" in O(1) per chunk, so a lookup costs O(matched chunks),
never O(cached entries).

Invariant (prefix closure): if an engine holds chain hash h[i] it also holds h[0..i-1],
and they are more recently used. It holds because a request touches its chain from the
last chunk to the first (the first is the most recent, like vLLM freeing a sequence's
blocks tail first) and any request containing h[i] also contains h[0..i-1]; LRU eviction
therefore always removes a chain's tail before its head. Thanks to it the holders of
h[i] are a subset of the holders of h[i-1], and `match` walks the request's chain once,
only doing per-engine work when the holder set shrinks.

Memory: one OrderedDict entry per (engine, chunk) plus one set entry, bounded by the
sum of engine capacities.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


class _EngineCache:
    __slots__ = ("capacity", "instance", "lru")

    def __init__(self, instance: str, capacity: int) -> None:
        self.instance = instance
        self.capacity = capacity
        self.lru: OrderedDict[int, None] = OrderedDict()


class PrefixIndex:
    def __init__(self) -> None:
        self._engines: dict[str, _EngineCache] = {}
        self._holders: dict[int, set[str]] = {}

    # --- engines -------------------------------------------------------------------
    def sync(self, engine_id: str, instance: str, capacity: int) -> None:
        """Tell the index an engine's current instance and capacity (in chunks). A new
        instance (restart) empties its entries; a smaller capacity evicts."""
        cache = self._engines.get(engine_id)
        if cache is None:
            self._engines[engine_id] = _EngineCache(instance, max(1, capacity))
            return
        if cache.instance != instance:
            self._clear(engine_id, cache)
            cache.instance = instance
        if cache.capacity != capacity:
            cache.capacity = max(1, capacity)
            self._evict(engine_id, cache)

    def forget(self, engine_id: str) -> None:
        """The engine left or restarted: drop everything it held."""
        cache = self._engines.pop(engine_id, None)
        if cache is not None:
            self._clear(engine_id, cache)

    def instance(self, engine_id: str) -> str | None:
        cache = self._engines.get(engine_id)
        return cache.instance if cache is not None else None

    def size(self, engine_id: str) -> int:
        cache = self._engines.get(engine_id)
        return len(cache.lru) if cache is not None else 0

    def capacity(self, engine_id: str) -> int:
        cache = self._engines.get(engine_id)
        return cache.capacity if cache is not None else 0

    def __len__(self) -> int:
        """Distinct chain hashes held by any engine."""
        return len(self._holders)

    def holders(self, chain_hash: int) -> frozenset[str]:
        return frozenset(self._holders.get(chain_hash, ()))

    def engines(self) -> Iterable[str]:
        return self._engines.keys()

    # --- the hot path ----------------------------------------------------------------
    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """For each engine holding at least the first chunk, how many leading chunks of
        `hashes` it holds. O(matched chunks + engines)."""
        holders = self._holders
        if not hashes:
            return {}
        alive = holders.get(hashes[0])
        if not alive:
            return {}
        out: dict[str, int] = {}
        n_alive = len(alive)
        i = 1
        n = len(hashes)
        while i < n:
            cur = holders.get(hashes[i])
            if cur is None:
                break
            if len(cur) != n_alive:  # some engines' prefixes end at chunk i
                for eid in alive:
                    if eid not in cur:
                        out[eid] = i
                alive = cur
                n_alive = len(cur)
            i += 1
        for eid in alive:
            out[eid] = i
        return out

    def record(self, engine_id: str, hashes: Sequence[int]) -> None:
        """The engine was sent a prompt with this chain: it now holds all of it (up to
        its capacity), the first chunk most recently used. O(chunks)."""
        cache = self._engines.get(engine_id)
        if cache is None or not hashes:
            return
        lru = cache.lru
        holders = self._holders
        if len(hashes) > cache.capacity:
            hashes = hashes[: cache.capacity]
        move = lru.move_to_end
        for h in reversed(hashes):
            if h in lru:
                move(h)
            else:
                lru[h] = None
                owners = holders.get(h)
                if owners is None:
                    holders[h] = {engine_id}
                else:
                    owners.add(engine_id)
        if len(lru) > cache.capacity:
            self._evict(engine_id, cache)

    # --- internals ---------------------------------------------------------------------
    def _evict(self, engine_id: str, cache: _EngineCache) -> None:
        lru = cache.lru
        holders = self._holders
        while len(lru) > cache.capacity:
            h, _ = lru.popitem(last=False)
            owners = holders.get(h)
            if owners is not None:
                owners.discard(engine_id)
                if not owners:
                    del holders[h]

    def _clear(self, engine_id: str, cache: _EngineCache) -> None:
        holders = self._holders
        for h in cache.lru:
            owners = holders.get(h)
            if owners is not None:
                owners.discard(engine_id)
                if not owners:
                    del holders[h]
        cache.lru.clear()
