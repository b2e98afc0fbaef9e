"""vLLM KV events: decoding both encodings from recorded fixtures (tests/data/kv_events,
recorded with vLLM 0.32's own classes by record.py there), hostile frames, and the precise
index against a reference model over random store / remove / clear sequences."""

from __future__ import annotations

import struct
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepinfer_router.kv_events.decode import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    DecodeError,
    _decode_typed,
    decode_batch,
    decode_generic,
    decode_message,
)
from deepinfer_router.kv_events.index import EngineBlocks, PreciseIndex, chain

FIXTURES = Path(__file__).resolve().parents[1] / "data" / "kv_events"


def frames(name: str) -> list[bytes]:
    data, out = (FIXTURES / name).read_bytes(), []
    while data:
        (n,) = struct.unpack(">I", data[:4])
        out.append(data[4:4 + n])
        data = data[4 + n:]
    return out


@pytest.mark.parametrize("name", ["vllm032_map.bin", "vllm032_int_hashes.bin"])
def test_vllm_032_map_encoding(name: str) -> None:
    batch = decode_message(frames(name))
    assert batch.seq == 7 and batch.ts == 1700000000.5 and batch.dp_rank is None
    stored, stored_cpu, removed, cleared = batch.events
    assert isinstance(stored, BlockStored) and stored.block_size == 16
    assert stored.token_ids == tuple(range(32)) and stored.parent_block_hash is None
    assert stored.extra_keys == (("salt-a",), None)
    assert isinstance(stored_cpu, BlockStored) and stored_cpu.medium == "CPU"
    assert stored_cpu.parent_block_hash == stored.block_hashes[1]
    assert isinstance(removed, BlockRemoved) and removed.block_hashes == stored_cpu.block_hashes
    assert isinstance(cleared, AllBlocksCleared)
    kind = int if "int" in name else bytes
    assert _decode_typed(7, frames(name)[2]) == batch  # taken by the fast path
    assert all(isinstance(h, kind) for h in stored.block_hashes)


def test_older_positional_encoding() -> None:
    batch = decode_message(frames("positional.bin"))
    assert batch.dp_rank == 0
    assert _decode_typed(batch.seq, frames("positional.bin")[2]) == batch
    stored, child, removed, cleared = batch.events
    assert isinstance(stored, BlockStored) and stored.block_hashes == (11, 12)
    assert isinstance(child, BlockStored) and child.parent_block_hash == 12
    assert child.medium == "GPU"  # omitted: vLLM's default tier
    assert isinstance(removed, BlockRemoved) and removed.block_hashes == (13,)
    assert isinstance(cleared, AllBlocksCleared)


def _enc(value: object) -> bytes:
    return msgspec.msgpack.encode(value)


@pytest.mark.parametrize("payload", [
    b"\xc1", _enc({"ts": 1}), _enc([1.0]), _enc([1.0, "x"]), _enc([1.0, [], "rank"]),
    _enc([1.0, [{"type": "BlockStored", "block_hashes": "x"}]]),
    _enc([1.0, [{"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None,
                 "token_ids": [1, 2], "block_size": 16}]]),  # tokens != block_size
    _enc([1.0, [{"type": "BlockStored", "block_hashes": [1.5], "parent_block_hash": None,
                 "token_ids": [], "block_size": 0}]]),
    _enc([1.0, [{"type": "BlockRemoved", "block_hashes": [[1]]}]]),
    _enc([1.0, [17]]),
    _enc([1.0, [], None, "more"]),  # longer than [ts, events, dp_rank]
    b"\x91" * 5000 + b"\xc0",  # arrays nested 5,000 deep
    _enc([1.0, [{"type": "BlockStored", "block_hashes": [1], "parent_block_hash": None,
                 "token_ids": [1], "block_size": 1, "extra_keys": [
                     __import__("functools").reduce(lambda a, _: [a], range(600), [])]}]]),
])
def test_hostile_payloads_raise_decode_error_only(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_batch(0, payload)


def test_unknown_event_types_are_skipped_and_frame_count_checked() -> None:
    batch = decode_batch(3, _enc([1.0, [{"type": "BlockReused", "x": 1}, ["Future", 1]]]))
    assert batch.events == []
    with pytest.raises(DecodeError):
        decode_message([b"", b"\x00" * 8])
    with pytest.raises(DecodeError):
        decode_message([b"", b"\x00" * 7, _enc([1.0, []])])


_hash = st.one_of(st.binary(min_size=1, max_size=8), st.integers(-2**63, 2**64 - 1))
_medium = st.sampled_from([None, "GPU", "cpu", "DISK"])


@st.composite
def _event(draw: st.DrawFn) -> dict[str, object]:
    kind = draw(st.sampled_from(["BlockStored", "BlockRemoved", "AllBlocksCleared",
                                 "BlockReused"]))
    hashes = draw(st.lists(_hash, min_size=1, max_size=3))
    size = draw(st.sampled_from([1, 2, 4]))
    tokens = draw(st.lists(st.integers(-1, 2**31), min_size=len(hashes) * size,
                           max_size=len(hashes) * size + draw(st.sampled_from([0, 0, 1]))))
    if kind == "BlockStored":
        return {"type": kind, "block_hashes": hashes, "parent_block_hash": draw(
            st.none() | _hash), "token_ids": tokens, "block_size": size, "lora_id": None,
            "medium": draw(_medium), "lora_name": draw(st.none() | st.just("ad")),
            "extra_keys": draw(st.none() | st.just([["s", 1]] + [None] * (len(hashes) - 1))),
            "group_idx": draw(st.none() | st.integers(0, 2))}
    if kind == "BlockRemoved":
        return {"type": kind, "block_hashes": hashes, "medium": draw(_medium)}
    return {"type": kind}


_POSITIONAL_FIELDS = {
    "BlockStored": ["block_hashes", "parent_block_hash", "token_ids", "block_size",
                    "lora_id", "medium", "lora_name", "extra_keys", "group_idx"],
    "BlockRemoved": ["block_hashes", "medium"], "AllBlocksCleared": [], "BlockReused": [],
}


@settings(max_examples=300, deadline=None)
@given(st.lists(_event(), max_size=4), st.booleans(),
       st.sampled_from([[], [None], [2], [True], [0, "more"]]),
       st.sampled_from([1.5, 7, True]))
def test_the_typed_fast_path_decodes_as_the_generic_path(
        events: list[dict[str, object]], positional: bool, tail: list[object],
        ts: object) -> None:
    """decode_batch's msgspec fast path gives what the generic path gives, or the same
    refusal, in both encodings (valid events, bad token ids, unknown types, odd batch
    timestamps and ranks, batches too long)."""
    if positional:
        events = [[e["type"], *(e[k] for k in _POSITIONAL_FIELDS[str(e["type"])])]
                  for e in events]  # type: ignore[misc]
    payload = _enc([ts, events, *tail])
    try:
        expected: object = decode_generic(4, payload)
    except DecodeError:
        expected = DecodeError
    try:
        got: object = decode_batch(4, payload)
    except DecodeError:
        got = DecodeError
    assert got == expected


# --- the index --------------------------------------------------------------------------

BS = 4


def stored(hashes: list[int], parent: int | None, tokens: list[int], medium: str = "GPU",
           extra: list[object] | None = None) -> BlockStored:
    return BlockStored(block_hashes=tuple(hashes), parent_block_hash=parent,
                       token_ids=tuple(tokens), block_size=BS, medium=medium,
                       extra_keys=None if extra is None else tuple(extra))


def test_match_walks_the_prefix_and_tiers() -> None:
    idx = PreciseIndex()
    prompt = list(range(14))  # 3 full blocks, a partial one never counts
    idx.apply("e1", [stored([1, 2], None, prompt[:8]), stored([3], 2, prompt[8:12], "CPU")])
    idx.apply("e2", [stored([7], None, prompt[:4])])
    got = idx.match(prompt, ["e1", "e2", "e3"])
    assert got["e1"][0].blocks == 3 and got["e1"][0].other_tier_blocks == 1
    assert got["e1"][0].weighted_tokens(BS, 0.5) == 2 * BS + 0.5 * BS
    assert got["e2"][0].blocks == 1 and "e3" not in got
    # Another prompt sharing only the first block.
    assert idx.match([0, 1, 2, 3, 9, 9, 9, 9], ["e1"])["e1"][0].blocks == 1
    # Removal in the middle ends the prefix there; GPU removal of a CPU block is a no-op.
    idx.apply("e1", [BlockRemoved((3,), medium="GPU")])
    assert idx.match(prompt, ["e1"])["e1"][0].blocks == 3
    idx.apply("e1", [BlockRemoved((2,))])
    assert idx.match(prompt, ["e1"])["e1"][0].blocks == 1
    idx.apply("e1", [AllBlocksCleared()])
    assert idx.match(prompt, ["e1"])["e1"][0].blocks == 0


def test_keys_do_not_depend_on_the_engines_hashes_and_salt_separates() -> None:
    a, b = EngineBlocks(), EngineBlocks()
    a.apply(stored([111, 222], None, list(range(8))))
    b.apply(stored([9, 8], None, list(range(8))))  # another seed, same content
    keys = chain(list(range(8)), BS)
    assert a.match(keys).blocks == b.match(keys).blocks == 2
    salted = EngineBlocks()
    salted.apply(stored([5, 6], None, list(range(8)), extra=[("s",), None]))
    assert salted.match(keys).blocks == 0
    assert salted.match(chain(list(range(8)), BS, salt="s")).blocks == 2


def test_unknown_parent_is_ignored_and_memory_is_bounded() -> None:
    blocks = EngineBlocks(max_blocks=10)
    blocks.apply(stored([50], 49, [1, 2, 3, 4]))  # parent never seen
    assert len(blocks) == 0
    tokens = list(range(4 * 30))
    blocks.apply(stored(list(range(100, 130)), None, tokens))
    assert len(blocks) == 10 and len(blocks.tiers) == 10
    # The oldest blocks went, so the prefix from the root is gone: a missed hint only.
    assert blocks.match(chain(tokens, BS)).blocks == 0


# A tree of blocks: node i > 0 has parent (i - 1) // 2 (node 0 the root's child), and
# its own 4 tokens; a node's prompt is the tokens along its path.
NODES = 15


def node_tokens(i: int) -> list[int]:
    return [1000 * i + j for j in range(BS)]


def path(i: int) -> list[int]:
    out = [i]
    while out[-1] > 0:
        out.append((out[-1] - 1) // 2)
    return out[::-1]


ops = st.lists(st.one_of(
    st.tuples(st.just("store"), st.integers(0, NODES - 1), st.sampled_from(["GPU", "CPU"])),
    st.tuples(st.just("remove"), st.integers(0, NODES - 1), st.sampled_from(["GPU", "CPU"])),
    st.tuples(st.just("clear"), st.just(0), st.just("GPU")),
), max_size=60)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_index_agrees_with_a_reference_model(sequence: list[tuple[str, int, str]]) -> None:
    blocks = EngineBlocks()
    tiers: dict[int, set[str]] = {}  # the model: node -> tiers holding it
    for op, node, medium in sequence:
        parent = (node - 1) // 2 if node > 0 else None
        if op == "store":
            blocks.apply(stored([node + 1], None if parent is None else parent + 1,
                                node_tokens(node), medium))
            if parent is None or tiers.get(parent):
                tiers.setdefault(node, set()).add(medium)
        elif op == "remove":
            blocks.apply(BlockRemoved((node + 1,), medium=medium))
            tiers.get(node, set()).discard(medium)
        else:
            blocks.apply(AllBlocksCleared())
            tiers.clear()
    for node in range(NODES):
        nodes = path(node)
        tokens = [t for n in nodes for t in node_tokens(n)]
        expected = 0
        for n in nodes:
            if not tiers.get(n):
                break
            expected += 1
        got = blocks.match(chain(tokens, BS))
        assert got.blocks == expected, (node, sequence)
        cpu_only = sum(1 for n in nodes[:expected] if tiers[n] == {"CPU"})
        assert got.other_tier_blocks == cpu_only
