"""Records the KV event fixtures next to this file (run with the test venv's Python):

    python tests/data/kv_events/record.py

- `vllm032_map.bin`: a message exactly as vLLM 0.32's publisher frames it (topic, seq,
  payload), payload encoded by vLLM's own classes (vllm/distributed/kv_events.py): events
  as maps tagged with `type`, block hashes as bytes.
- `vllm032_int_hashes.bin`: the same with integer block hashes
  (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES).
- `positional.bin`: the older positional encoding (structs `array_like=True, tag=True`,
  the field order of vLLM 0.9's KVCacheEvent classes), integer hashes.

Each file: the three frames, each prefixed by its length as 4 bytes big-endian.
"""

from __future__ import annotations

import struct
from pathlib import Path

import msgspec

HERE = Path(__file__).parent


def frames_file(path: Path, frames: list[bytes]) -> None:
    path.write_bytes(b"".join(struct.pack(">I", len(f)) + f for f in frames))


def vllm_032(int_hashes: bool) -> bytes:
    from vllm.distributed.kv_events import (
        AllBlocksCleared,
        BlockRemoved,
        BlockStored,
        KVEventBatch,
    )

    def h(i: int) -> bytes | int:
        return i * 1_000_003 if int_hashes else i.to_bytes(32, "big")

    events = [
        BlockStored(block_hashes=[h(1), h(2)], parent_block_hash=None,
                    token_ids=list(range(32)), block_size=16, lora_id=None, medium="GPU",
                    lora_name=None, extra_keys=[("salt-a",), None], group_idx=0),
        BlockStored(block_hashes=[h(3)], parent_block_hash=h(2),
                    token_ids=list(range(32, 48)), block_size=16, lora_id=None,
                    medium="CPU", lora_name=None),
        BlockRemoved(block_hashes=[h(3)], medium="CPU"),
        AllBlocksCleared(),
    ]
    return msgspec.msgpack.Encoder().encode(KVEventBatch(ts=1700000000.5, events=events))


class OldEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    pass


class OldBlockStored(OldEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None


class OldBlockRemoved(OldEvent, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None


class OldAllBlocksCleared(OldEvent, tag="AllBlocksCleared"):
    pass


class OldBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[OldBlockStored | OldBlockRemoved | OldAllBlocksCleared]
    data_parallel_rank: int | None = None


def positional() -> bytes:
    events = [
        OldBlockStored([11, 12], None, list(range(32)), 16, None, "GPU"),
        OldBlockStored([13], 12, list(range(32, 48)), 16, None, None),
        OldBlockRemoved([13], "GPU"),
        OldAllBlocksCleared(),
    ]
    return msgspec.msgpack.Encoder().encode(OldBatch(ts=1700000000.5, events=events,
                                                     data_parallel_rank=0))


def main() -> None:
    seq = (7).to_bytes(8, "big")
    frames_file(HERE / "vllm032_map.bin", [b"kv", seq, vllm_032(False)])
    frames_file(HERE / "vllm032_int_hashes.bin", [b"kv", seq, vllm_032(True)])
    frames_file(HERE / "positional.bin", [b"", seq, positional()])


if __name__ == "__main__":
    main()
