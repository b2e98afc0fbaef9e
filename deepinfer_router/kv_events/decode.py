"""vLLM's KV cache events, decoded. Pure: frames in, typed events out.

A message on vLLM's ZMQ publisher (vllm/distributed/kv_events.py, ZmqEventPublisher) is
multipart `[topic, 8-byte big-endian sequence, msgpack batch]`; the batch is an array
`[ts, events, dp_rank]` (dp_rank omitted when None). Events come in two encodings:

- vLLM 0.32 (msgspec `tag=True` structs): maps with a `type` key,
  `{"type": "BlockStored", "block_hashes": [...], "parent_block_hash": ..., ...}`;
- older vLLM (`array_like=True` as well): positional arrays whose first item is the tag,
  `["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id,
  medium]`, `["BlockRemoved", block_hashes, medium]`, `["AllBlocksCleared"]`.

Block hashes are bytes, or integers with VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES: both are
kept as they come (hashable either way). The feed is untrusted input: anything malformed
raises DecodeError, never anything else, and sizes are bounded.

A message is decoded by msgspec into typed structs first (the checks run in C; a stored
block's token ids are checked one by one, so this is the router's main cost per KV
event), as vLLM 0.32's tagged maps, then as older positional arrays; only where both
refuse (an unknown event type, a malformed field) by the generic path, which says what
is wrong or skips the event.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
from msgspec import Meta, Struct

BlockHash = bytes | int
MAX_EVENTS_PER_BATCH = 100_000
MAX_BLOCKS_PER_EVENT = 65_536
MAX_TOKENS_PER_EVENT = 65_536 * 64
END_OF_REPLAY = -1  # the sequence vLLM's replay socket ends with

_decoder = msgspec.msgpack.Decoder()


class DecodeError(ValueError):
    """A frame that is not a valid KV event message."""


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: tuple[BlockHash, ...]
    parent_block_hash: BlockHash | None
    token_ids: tuple[int, ...]
    block_size: int
    medium: str = "GPU"
    lora_name: str | None = None
    # One entry per block (or None): what else went into vLLM's hash (cache salt,
    # multimodal ids, LoRA): two equal token blocks with different extras are different
    # caches.
    extra_keys: tuple[Any, ...] | None = None
    group_idx: int = 0


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: tuple[BlockHash, ...]
    medium: str = "GPU"
    group_idx: int = 0


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


Event = BlockStored | BlockRemoved | AllBlocksCleared


@dataclass(frozen=True, slots=True)
class EventBatch:
    seq: int
    ts: float
    events: list[Event] = field(default_factory=list)
    dp_rank: int | None = None


def _hash(value: Any) -> BlockHash:
    if isinstance(value, bytes | int) and not isinstance(value, bool):
        return value
    raise DecodeError(f"block hash must be bytes or int, got {type(value).__name__}")


def _hashes(value: Any) -> tuple[BlockHash, ...]:
    if not isinstance(value, list) or len(value) > MAX_BLOCKS_PER_EVENT:
        raise DecodeError("block_hashes must be a list of bounded length")
    return tuple(_hash(v) for v in value)


def _int(value: Any, what: str, default: int | None = None) -> int:
    if value is None and default is not None:
        return default
    if not isinstance(value, int) or isinstance(value, bool):
        raise DecodeError(f"{what} must be an integer")
    return value


def _medium(value: Any) -> str:
    if value is None:
        return "GPU"  # vLLM's default tier when it does not say
    if not isinstance(value, str) or len(value) > 32:
        raise DecodeError("medium must be a short string")
    return value.upper()


def _optional_str(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or len(value) > 256:
        raise DecodeError(f"{what} must be a short string")
    return value


_MAX_EXTRA_DEPTH = 16  # vLLM's extra keys nest two or three deep


def _freeze(value: Any, depth: int = 0) -> Any:
    """extra_keys entries as hashable tuples (msgpack gives lists); bounded nesting."""
    if isinstance(value, list):
        if depth >= _MAX_EXTRA_DEPTH:
            raise DecodeError("extra_keys nest too deep")
        return tuple(_freeze(v, depth + 1) for v in value)
    return value


_MAX_TOKEN_ID = 1 << 31


def _stored(f: dict[str, Any]) -> BlockStored:
    hashes = _hashes(f.get("block_hashes"))
    tokens = f.get("token_ids")
    if not isinstance(tokens, list) or len(tokens) > MAX_TOKENS_PER_EVENT:
        raise DecodeError("token_ids must be a list of bounded length")
    if not all(type(t) is int and 0 <= t < _MAX_TOKEN_ID for t in tokens):
        raise DecodeError("token_ids must be vocabulary indices (integers below 2**31)")
    block_size = _int(f.get("block_size"), "block_size")
    if block_size <= 0 or len(tokens) != block_size * len(hashes):
        raise DecodeError("token_ids must hold block_size tokens per block")
    parent = f.get("parent_block_hash")
    extra = f.get("extra_keys")
    if extra is not None:
        if not isinstance(extra, list) or len(extra) != len(hashes):
            raise DecodeError("extra_keys must hold one entry per block")
        extra = tuple(_freeze(e) for e in extra)
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=None if parent is None else _hash(parent),
        token_ids=tuple(tokens),
        block_size=block_size,
        medium=_medium(f.get("medium")),
        lora_name=_optional_str(f.get("lora_name"), "lora_name"),
        extra_keys=extra,
        group_idx=_int(f.get("group_idx"), "group_idx", default=0),
    )


def _removed(f: dict[str, Any]) -> BlockRemoved:
    return BlockRemoved(block_hashes=_hashes(f.get("block_hashes")),
                        medium=_medium(f.get("medium")),
                        group_idx=_int(f.get("group_idx"), "group_idx", default=0))


# Field order of the positional (array_like) encoding of older vLLM releases.
_POSITIONAL = {
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size",
                    "lora_id", "medium", "lora_name", "extra_keys", "group_idx"),
    "BlockRemoved": ("block_hashes", "medium", "group_idx"),
    "AllBlocksCleared": (),
}


def decode_event(raw: Any) -> Event | None:
    """One event of either encoding; None for an event type this router does not use
    (newer vLLM may add some)."""
    if isinstance(raw, dict):
        kind, fields = raw.get("type"), raw
    elif isinstance(raw, list) and raw and isinstance(raw[0], str):
        kind = raw[0]
        names = _POSITIONAL.get(kind)
        if names is None:
            return None
        fields = dict(zip(names, raw[1:], strict=False))
    else:
        raise DecodeError("an event must be a tagged map or a tagged array")
    if kind == "BlockStored":
        return _stored(fields)
    if kind == "BlockRemoved":
        return _removed(fields)
    if kind == "AllBlocksCleared":
        return AllBlocksCleared()
    if not isinstance(kind, str):
        raise DecodeError("event type must be a string")
    return None


def decode_sequence(frame: bytes) -> int:
    if len(frame) != 8:
        raise DecodeError("the sequence frame must be 8 bytes")
    return int.from_bytes(frame, "big", signed=True)


# --- the typed fast path ---------------------------------------------------------------
_Hash = bytes | int
_Hashes = Annotated[list[_Hash], Meta(max_length=MAX_BLOCKS_PER_EVENT)]
_TokenIds = Annotated[list[Annotated[int, Meta(ge=0, lt=_MAX_TOKEN_ID)]],
                      Meta(max_length=MAX_TOKENS_PER_EVENT)]
_Medium = Annotated[str, Meta(max_length=32)] | None


class _TaggedStored(Struct, tag="BlockStored", tag_field="type"):
    block_hashes: _Hashes
    parent_block_hash: _Hash | None
    token_ids: _TokenIds
    block_size: Annotated[int, Meta(gt=0)]
    medium: _Medium = None
    lora_name: Annotated[str, Meta(max_length=256)] | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


class _TaggedRemoved(Struct, tag="BlockRemoved", tag_field="type"):
    block_hashes: _Hashes
    medium: _Medium = None
    group_idx: int | None = None


class _TaggedCleared(Struct, tag="AllBlocksCleared", tag_field="type"):
    pass


class _PositionalStored(Struct, tag="BlockStored", array_like=True):
    block_hashes: _Hashes
    parent_block_hash: _Hash | None
    token_ids: _TokenIds
    block_size: Annotated[int, Meta(gt=0)]
    lora_id: Any = None  # not used (the generic path ignores it too)
    medium: _Medium = None
    lora_name: Annotated[str, Meta(max_length=256)] | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None


class _PositionalRemoved(Struct, tag="BlockRemoved", array_like=True):
    block_hashes: _Hashes
    medium: _Medium = None
    group_idx: int | None = None


class _PositionalCleared(Struct, tag="AllBlocksCleared", array_like=True):
    pass


# Events ignore fields they do not know (newer vLLM adds some), as the generic path
# does; a batch longer than [ts, events, dp_rank] is refused, as the generic path does.
class _TaggedBatch(Struct, array_like=True, forbid_unknown_fields=True):
    ts: float
    events: Annotated[list[_TaggedStored | _TaggedRemoved | _TaggedCleared],
                      Meta(max_length=MAX_EVENTS_PER_BATCH)]
    dp_rank: int | None = None


class _PositionalBatch(Struct, array_like=True, forbid_unknown_fields=True):
    ts: float
    events: Annotated[list[_PositionalStored | _PositionalRemoved | _PositionalCleared],
                      Meta(max_length=MAX_EVENTS_PER_BATCH)]
    dp_rank: int | None = None


_typed_decoders = (msgspec.msgpack.Decoder(_TaggedBatch),
                   msgspec.msgpack.Decoder(_PositionalBatch))


def _typed_event(e: Any) -> Event | None:
    if isinstance(e, _TaggedStored | _PositionalStored):
        if len(e.token_ids) != e.block_size * len(e.block_hashes):
            return None  # the generic path says why
        extra = None
        if e.extra_keys is not None:
            if len(e.extra_keys) != len(e.block_hashes):
                return None
            extra = tuple(_freeze(x) for x in e.extra_keys)
        return BlockStored(
            block_hashes=tuple(e.block_hashes), parent_block_hash=e.parent_block_hash,
            token_ids=tuple(e.token_ids), block_size=e.block_size,
            medium="GPU" if e.medium is None else e.medium.upper(),
            lora_name=e.lora_name, extra_keys=extra, group_idx=e.group_idx or 0)
    if isinstance(e, _TaggedRemoved | _PositionalRemoved):
        return BlockRemoved(block_hashes=tuple(e.block_hashes),
                            medium="GPU" if e.medium is None else e.medium.upper(),
                            group_idx=e.group_idx or 0)
    return AllBlocksCleared()


def _decode_typed(seq: int, payload: bytes) -> EventBatch | None:
    """The batch through msgspec's typed decoders (vLLM 0.32's tagged maps, then older
    positional arrays); None where neither takes it whole."""
    for decoder in _typed_decoders:
        try:
            raw = decoder.decode(payload)
        except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
            continue
        events: list[Event] = []
        for e in raw.events:
            event = _typed_event(e)
            if event is None:
                return None
            events.append(event)
        return EventBatch(seq=seq, ts=raw.ts, events=events, dp_rank=raw.dp_rank)
    return None


def decode_batch(seq: int, payload: bytes) -> EventBatch:
    """The msgpack batch `[ts, events, dp_rank?]` of sequence `seq`."""
    try:
        typed = _decode_typed(seq, payload)
        return typed if typed is not None else decode_generic(seq, payload)
    except RecursionError:  # msgpack nested thousands deep: refused, not a crash
        raise DecodeError("nested too deep") from None


def decode_generic(seq: int, payload: bytes) -> EventBatch:
    """decode_batch without the typed fast path: says what is wrong with a malformed
    batch, skips event types this router does not use."""
    try:
        raw = _decoder.decode(payload)
    except (msgspec.DecodeError, ValueError) as exc:
        raise DecodeError(f"not msgpack: {exc}") from None
    if not isinstance(raw, list) or len(raw) not in (2, 3):
        raise DecodeError("a batch must be [ts, events] or [ts, events, dp_rank]")
    ts, events = raw[0], raw[1]
    if not isinstance(ts, int | float) or not isinstance(events, list):
        raise DecodeError("a batch must be [ts, events, ...]")
    if len(events) > MAX_EVENTS_PER_BATCH:
        raise DecodeError("too many events in one batch")
    dp_rank = raw[2] if len(raw) == 3 else None
    if dp_rank is not None and (not isinstance(dp_rank, int) or isinstance(dp_rank, bool)):
        raise DecodeError("dp_rank must be an integer")
    decoded = [e for e in map(decode_event, events) if e is not None]
    return EventBatch(seq=seq, ts=float(ts), events=decoded, dp_rank=dp_rank)


def decode_message(frames: list[bytes]) -> EventBatch:
    """A published (or replayed) message: `[topic, seq, payload]`."""
    if len(frames) != 3:
        raise DecodeError(f"expected 3 frames (topic, seq, payload), got {len(frames)}")
    return decode_batch(decode_sequence(frames[1]), frames[2])
