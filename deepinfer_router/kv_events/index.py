"""What each engine really holds in its KV cache, from its own events. Pure.

Keys are the router's own hash chain over each block's token ids (never vLLM's hash,
which depends on PYTHONHASHSEED and prefix_caching_hash_algo): key(block) = xxh3_64 of
the block's token ids seeded with the parent block's key, then of what else makes equal
tokens a different cache (LoRA name, extra keys such as cache salt and multimodal ids,
the KV cache group) where there is any. Keys live only in this process.
A map from the engine's block hashes to these keys lets BlockRemoved find its blocks.

A request is looked up by computing the same chain over its prompt's token ids (per
block size in use) and walking it while an engine holds the block: prefix caching only
reuses a block whose whole prefix is cached, so the walk stops at the first miss. Each
key records the tiers (`medium`: GPU, CPU, ...) holding it, so a CPU-tier hit can be
weighted below a GPU hit.

Memory is bounded per engine (events are untrusted input): past `max_blocks`, the
engine's least recently stored blocks are forgotten (a cached block the index forgets
costs only a missed hint, never a wrong one).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import takewhile
from typing import Any

import xxhash

from .decode import AllBlocksCleared, BlockHash, BlockRemoved, BlockStored, Event

GPU = 1
OTHER_TIER = 2  # CPU, disk, remote: anything slower to bring back than GPU memory
DEFAULT_MAX_BLOCKS = 1 << 20
ROOT = 0


def _tier(medium: str) -> int:
    return GPU if medium == "GPU" else OTHER_TIER


def token_bytes(tokens: Sequence[int]) -> bytes:
    """Token ids as 4-byte machine integers: what the keys hash (ids are below 2**31:
    the decoder and the request side check). One C call for a whole prompt."""
    return array("i", tokens).tobytes()


def _key(parent: int, data: bytes | memoryview, lora: str | None, extra: Any,
         group: int) -> int:
    h = xxhash.xxh3_64_intdigest(data, seed=parent)
    if lora or extra is not None or group:
        h = xxhash.xxh3_64_intdigest(repr((lora, extra, group)).encode(), seed=h)
    return h


def block_key(parent: int, tokens: Sequence[int], lora: str | None = None,
              extra: Any = None, group: int = 0) -> int:
    """The router's key of one block given its parent's key."""
    return _key(parent, token_bytes(tokens), lora, extra, group)


def request_extra(index: int, lora: str | None, salt: str | None) -> tuple[Any, ...] | None:
    """What vLLM puts in a text block's extra keys (vllm/v1/core/kv_cache_utils.py,
    generate_block_hash_extra_keys): the LoRA name on every block, the cache salt on
    the first only; None when there is nothing."""
    extra = ((lora,) if lora else ()) + ((salt,) if salt and index == 0 else ())
    return extra or None


def chain(tokens: Sequence[int], block_size: int, lora: str | None = None,
          salt: str | None = None) -> list[int]:
    """Keys of a prompt's full blocks (a partial last block is never cached): one hash
    call per block over a view of the prompt's bytes."""
    data = memoryview(token_bytes(tokens))
    step = block_size * 4
    keys: list[int] = []
    parent = ROOT
    digest = xxhash.xxh3_64_intdigest
    for i in range(len(tokens) // block_size):
        block = data[i * step:(i + 1) * step]
        if lora or (salt and i == 0):
            parent = _key(parent, block, lora, request_extra(i, lora, salt), 0)
        else:
            parent = digest(block, seed=parent)
        keys.append(parent)
    return keys


@dataclass(slots=True)
class Match:
    """How much of a prompt an engine holds: leading blocks, and how many of them only
    in a slower tier."""

    blocks: int = 0
    other_tier_blocks: int = 0

    def weighted_tokens(self, block_size: int, other_tier_weight: float) -> float:
        gpu = self.blocks - self.other_tier_blocks
        return (gpu + other_tier_weight * self.other_tier_blocks) * block_size


class EngineBlocks:
    """One engine's blocks: engine hash -> router key, router key -> tiers."""

    __slots__ = ("block_sizes", "by_engine_hash", "max_blocks", "other_tiers", "tiers")

    def __init__(self, max_blocks: int = DEFAULT_MAX_BLOCKS) -> None:
        self.max_blocks = max_blocks
        self.by_engine_hash: OrderedDict[tuple[int, BlockHash], int] = OrderedDict()
        self.tiers: dict[int, int] = {}  # router key -> tier bits
        self.block_sizes: set[int] = set()
        self.other_tiers = False  # any block stored outside GPU memory since the last clear

    def __len__(self) -> int:
        return len(self.by_engine_hash)

    def clear(self) -> None:
        self.by_engine_hash.clear()
        self.tiers.clear()
        self.other_tiers = False

    def apply(self, event: Event) -> None:
        if isinstance(event, BlockStored):
            self._stored(event)
        elif isinstance(event, BlockRemoved):
            self._removed(event)
        elif isinstance(event, AllBlocksCleared):
            self.clear()

    def _stored(self, e: BlockStored) -> None:
        self.block_sizes.add(e.block_size)
        if e.parent_block_hash is None:
            parent = ROOT
        else:
            found = self.by_engine_hash.get((e.group_idx, e.parent_block_hash))
            if found is None:
                return  # its prefix is unknown to us: no request could reach it
            parent = found
        tier = _tier(e.medium)
        data = memoryview(token_bytes(e.token_ids))
        step = e.block_size * 4
        for i, engine_hash in enumerate(e.block_hashes):
            extra = e.extra_keys[i] if e.extra_keys is not None else None
            key = _key(parent, data[i * step:(i + 1) * step], e.lora_name, extra, e.group_idx)
            slot = (e.group_idx, engine_hash)
            self.by_engine_hash[slot] = key
            self.by_engine_hash.move_to_end(slot)
            self.tiers[key] = self.tiers.get(key, 0) | tier
            parent = key
        if tier != GPU:
            self.other_tiers = True
        while len(self.by_engine_hash) > self.max_blocks:
            _, key = self.by_engine_hash.popitem(last=False)
            self.tiers.pop(key, None)

    def _removed(self, e: BlockRemoved) -> None:
        tier = _tier(e.medium)
        for engine_hash in e.block_hashes:
            slot = (e.group_idx, engine_hash)
            key = self.by_engine_hash.get(slot)
            if key is None:
                continue
            left = self.tiers.get(key, 0) & ~tier
            if left:
                self.tiers[key] = left
            else:
                self.tiers.pop(key, None)
                del self.by_engine_hash[slot]

    def match(self, keys: Sequence[int]) -> Match:
        # The walk runs in C (takewhile over the dict's own __contains__): every key in
        # `tiers` has a tier bit set (one whose last tier goes is removed). The tiers of
        # the held blocks are read only where some block sits outside GPU memory.
        held = len(list(takewhile(self.tiers.__contains__, keys)))
        m = Match(blocks=held)
        if held and self.other_tiers:
            tiers = self.tiers
            m.other_tier_blocks = sum(1 for k in keys[:held] if not tiers[k] & GPU)
        return m


class PreciseIndex:
    """Every subscribed engine's blocks, looked up per request."""

    def __init__(self, max_blocks_per_engine: int = DEFAULT_MAX_BLOCKS) -> None:
        self.max_blocks = max_blocks_per_engine
        self.engines: dict[str, EngineBlocks] = {}

    def engine(self, engine_id: str) -> EngineBlocks:
        blocks = self.engines.get(engine_id)
        if blocks is None:
            blocks = self.engines[engine_id] = EngineBlocks(self.max_blocks)
        return blocks

    def forget(self, engine_id: str) -> None:
        self.engines.pop(engine_id, None)

    def apply(self, engine_id: str, events: Iterable[Event]) -> None:
        blocks = self.engine(engine_id)
        for event in events:
            blocks.apply(event)

    def match(self, tokens: Sequence[int], engine_ids: Iterable[str],
              lora: str | None = None, salt: str | None = None
              ) -> dict[str, tuple[Match, int]]:
        """Per engine: what it holds of the prompt, and its block size."""
        chains: dict[int, list[int]] = {}
        out: dict[str, tuple[Match, int]] = {}
        for engine_id in engine_ids:
            blocks = self.engines.get(engine_id)
            if blocks is None or not blocks.block_sizes:
                continue
            size = min(blocks.block_sizes)
            keys = chains.get(size)
            if keys is None:
                keys = chains[size] = chain(tokens, size, lora, salt)
            out[engine_id] = (blocks.match(keys), size)
        return out
