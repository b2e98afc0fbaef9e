"""The simulated engine's KV cache events, in vLLM's wire format. Pure.

The cache (kv_cache.py) reports each block it starts caching (`Stored`) and each cached
block it evicts (`Removed`); `encode_batch` turns them into the msgpack batch vLLM's
ZmqEventPublisher sends (vllm/distributed/kv_events.py): `[ts, events, dp_rank]`, events
either as vLLM 0.32 writes them (maps tagged with `type`) or as older releases did
(positional arrays tagged first). Block hashes are the cache's own integers, as vLLM
sends them with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES; token ids are those /tokenize
reports (tokenizer.token_id)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

Encoding = Literal["tagged", "positional"]
_encoder = msgspec.msgpack.Encoder()


@dataclass(frozen=True, slots=True)
class Stored:
    block_hash: int
    parent_hash: int | None  # None for a prompt's first block
    token_ids: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Removed:
    block_hash: int


SimEvent = Stored | Removed


def _event(e: SimEvent, block_size: int, encoding: Encoding) -> Any:
    if isinstance(e, Stored):
        if encoding == "positional":
            return ["BlockStored", [e.block_hash], e.parent_hash, list(e.token_ids),
                    block_size, None, "GPU"]
        return {"type": "BlockStored", "block_hashes": [e.block_hash],
                "parent_block_hash": e.parent_hash, "token_ids": list(e.token_ids),
                "block_size": block_size, "lora_id": None, "medium": "GPU",
                "lora_name": None, "extra_keys": None, "group_idx": 0}
    if encoding == "positional":
        return ["BlockRemoved", [e.block_hash], "GPU"]
    return {"type": "BlockRemoved", "block_hashes": [e.block_hash], "medium": "GPU"}


def encode_batch(ts: float, events: Sequence[SimEvent], block_size: int,
                 encoding: Encoding = "tagged") -> bytes:
    """One batch as vLLM's publisher encodes it (dp_rank None, as a single engine)."""
    return _encoder.encode([ts, [_event(e, block_size, encoding) for e in events], None])
