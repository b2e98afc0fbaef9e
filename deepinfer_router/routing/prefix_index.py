"""Which prompt prefixes each engine probably still holds in its KV cache.

The estimate is what the router sent there: every chain hash (see features.py) of every
request routed to an engine, in a per-engine LRU sized like the engine's KV cache
(capacity in characters / chunk characters). A global map hash -> bitmask of the engines
holding it answers "who holds this prefix" in O(1) per chunk, so the per-request work
never depends on how many entries are cached.

Invariant (prefix closure): if an engine holds chain hash h[i] it also holds h[0..i-1],
and they are more recently used. It holds because a request touches its chain from the
last chunk to the first (the first ends up most recent, like vLLM freeing a sequence's
blocks tail first) and any request containing h[i] also contains h[0..i-1]; LRU
eviction therefore removes a chain's tail before its head. So along a request's chain
the holder sets only shrink, and `match` finds where each engine's prefix ends with a
binary search per distinct end: O(log chunks) lookups per engine whose match ends
inside the prompt, O(1) for a prompt nobody holds.

Recency: `record` counts the requests it is told about (`clock`) and stamps every chunk
it touches with that count, so `tail_age` says, in O(1), how many requests ago an
engine's least recently used chunk was last sent: what the next eviction there would
remove (cache pressure, see kv_aware.py).

Memory: one OrderedDict entry per (engine, chunk) plus one int per distinct chunk,
bounded by the sum of engine capacities (about 150 bytes per (engine, chunk)).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence


class _EngineCache:
    __slots__ = ("bit", "capacity", "instance", "lru")

    def __init__(self, instance: str, capacity: int, bit: int) -> None:
        self.instance = instance
        self.capacity = capacity
        self.bit = bit
        self.lru: OrderedDict[int, int] = OrderedDict()  # chain hash -> clock when touched


class PrefixIndex:
    def __init__(self) -> None:
        self._engines: dict[str, _EngineCache] = {}
        self._holders: dict[int, int] = {}  # chain hash -> bitmask of engine slots
        self._by_bit: dict[int, str] = {}  # slot bit -> engine id
        self._free_bits: list[int] = []
        self.clock = 0  # requests recorded so far

    # --- engines -------------------------------------------------------------------
    def sync(self, engine_id: str, instance: str, capacity: int) -> None:
        """Tell the index an engine's current instance and capacity (in chunks). A new
        instance (restart) empties its entries; a smaller capacity evicts."""
        cache = self._engines.get(engine_id)
        if cache is None:
            bit = self._free_bits.pop() if self._free_bits else 1 << len(self._engines)
            self._engines[engine_id] = _EngineCache(instance, max(1, capacity), bit)
            self._by_bit[bit] = engine_id
            return
        if cache.instance != instance:
            self._clear(cache)
            cache.instance = instance
        if cache.capacity != max(1, capacity):
            cache.capacity = max(1, capacity)
            self._evict(cache)

    def forget(self, engine_id: str) -> None:
        """The engine left or restarted: drop everything it held."""
        cache = self._engines.pop(engine_id, None)
        if cache is not None:
            self._clear(cache)
            del self._by_bit[cache.bit]
            self._free_bits.append(cache.bit)

    def instance(self, engine_id: str) -> str | None:
        cache = self._engines.get(engine_id)
        return cache.instance if cache is not None else None

    def size(self, engine_id: str) -> int:
        cache = self._engines.get(engine_id)
        return len(cache.lru) if cache is not None else 0

    def capacity(self, engine_id: str) -> int:
        cache = self._engines.get(engine_id)
        return cache.capacity if cache is not None else 0

    def occupancy(self, engine_id: str) -> tuple[int, int, int]:
        """(chunks held, capacity in chunks, requests since the least recently used chunk
        was touched; -1 when empty) of one engine, O(1)."""
        cache = self._engines.get(engine_id)
        if cache is None:
            return 0, 1, -1
        lru = cache.lru
        if not lru:
            return 0, cache.capacity, -1
        return len(lru), cache.capacity, self.clock - next(iter(lru.values()))

    def touched(self, engine_id: str, chain_hash: int) -> int | None:
        """The clock when `engine_id` was last sent `chain_hash` (None: not held)."""
        cache = self._engines.get(engine_id)
        return cache.lru.get(chain_hash) if cache is not None else None

    def __len__(self) -> int:
        """Distinct chain hashes held by any engine."""
        return len(self._holders)

    def holders(self, chain_hash: int) -> frozenset[str]:
        mask = self._holders.get(chain_hash, 0)
        return frozenset(eid for bit, eid in self._by_bit.items() if mask & bit)

    def engines(self) -> Iterable[str]:
        return self._engines.keys()

    # --- the hot path ----------------------------------------------------------------
    def match(self, hashes: Sequence[int]) -> dict[str, int]:
        """For each engine holding at least the first chunk, how many leading chunks of
        `hashes` it holds."""
        if not hashes:
            return {}
        get = self._holders.get
        alive = get(hashes[0], 0)
        if not alive:
            return {}
        by_bit = self._by_bit
        out: dict[str, int] = {}
        last = len(hashes) - 1
        lo = 0  # every engine in `alive` holds hashes[0..lo]
        while True:
            # the last index still held by all of `alive` (monotone by prefix closure)
            if get(hashes[last], 0) & alive == alive:
                lo = last
            else:
                hi = last  # not held by all of `alive`
                while hi - lo > 1:
                    mid = (lo + hi) >> 1
                    if get(hashes[mid], 0) & alive == alive:
                        lo = mid
                    else:
                        hi = mid
            nxt = get(hashes[lo + 1], 0) & alive if lo < last else 0
            ended = alive & ~nxt
            while ended:  # engines whose prefix ends at chunk lo
                bit = ended & -ended
                out[by_bit[bit]] = lo + 1
                ended ^= bit
            if not nxt:
                return out
            alive = nxt
            lo += 1

    def record(self, engine_id: str, hashes: Sequence[int]) -> None:
        """The engine was sent a prompt with this chain: it now holds all of it (up to
        its capacity), the first chunk most recently used. O(chunks)."""
        cache = self._engines.get(engine_id)
        if cache is None or not hashes:
            return
        self.clock += 1
        now = self.clock
        lru = cache.lru
        holders = self._holders
        bit = cache.bit
        if len(hashes) > cache.capacity:
            hashes = hashes[: cache.capacity]
        move = lru.move_to_end
        for h in reversed(hashes):
            if h in lru:
                lru[h] = now
                move(h)
            else:
                lru[h] = now
                holders[h] = holders.get(h, 0) | bit
        if len(lru) > cache.capacity:
            self._evict(cache)

    # --- internals ---------------------------------------------------------------------
    def _drop(self, h: int, bit: int) -> None:
        mask = self._holders.get(h, 0) & ~bit
        if mask:
            self._holders[h] = mask
        else:
            self._holders.pop(h, None)

    def _evict(self, cache: _EngineCache) -> None:
        lru = cache.lru
        while len(lru) > cache.capacity:
            h, _ = lru.popitem(last=False)
            self._drop(h, cache.bit)

    def _clear(self, cache: _EngineCache) -> None:
        for h in cache.lru:
            self._drop(h, cache.bit)
        cache.lru.clear()
