"""The per-engine cache estimate: bounded, prefix-closed, and matched in one walk."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from deepinfer_router.routing.features import chain_hashes
from deepinfer_router.routing.prefix_index import PrefixIndex

CHUNK = 4
TEXTS = ["aaaabbbbccccdddd", "aaaabbbbxxxx", "aaaazzzzzzzzzzzz", "qqqqrrrr", "aaaabbbbccccdddd"
         "eeeeffff"]


def chains(texts: list[str]) -> list[list[int]]:
    return [chain_hashes(t, CHUNK, "m") for t in texts]


def brute_match(index: PrefixIndex, hashes: list[int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for eid in list(index.engines()):
        k = 0
        while k < len(hashes) and eid in index.holders(hashes[k]):
            k += 1
        if k:
            out[eid] = k
    return out


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, len(TEXTS) - 1), st.integers(1, 40)),
        max_size=60,
    ),
    st.integers(min_value=1, max_value=8),
)
def test_prefix_closed_and_match_is_exact(ops: list[tuple[int, int, int]], cap: int) -> None:
    index = PrefixIndex()
    for e in range(4):
        index.sync(f"e{e}", "1", cap)
    all_chains = chains(TEXTS)
    for e, t, cut in ops:
        index.record(f"e{e}", all_chains[t][:cut])
        for eid in index.engines():
            assert index.size(eid) <= cap
        for chain in all_chains:  # holders(h[i]) is a subset of holders(h[i-1])
            for i in range(1, len(chain)):
                assert index.holders(chain[i]) <= index.holders(chain[i - 1])
            assert index.match(chain) == brute_match(index, chain)


def test_lru_evicts_tails_before_heads() -> None:
    index = PrefixIndex()
    index.sync("e", "1", 4)
    a, b = chains(["aaaabbbbccccdddd", "xxxxyyyy"])
    index.record("e", a)  # 4 entries, full
    index.record("e", b)  # 2 more: the two least recent go, a's tail
    assert index.match(a) == {"e": 2}
    assert index.match(b) == {"e": 2}


def test_sync_new_instance_clears_and_capacity_shrinks() -> None:
    index = PrefixIndex()
    index.sync("e", "1", 10)
    (a,) = chains(["aaaabbbbccccdddd"])
    index.record("e", a)
    index.sync("e", "1", 2)
    assert index.match(a) == {"e": 2}
    index.sync("e", "2", 2)
    assert index.match(a) == {} and len(index) == 0


def test_forget_drops_holders() -> None:
    index = PrefixIndex()
    for e in ("e0", "e1"):
        index.sync(e, "1", 10)
    (a,) = chains(["aaaabbbbcccc"])
    index.record("e0", a)
    index.record("e1", a[:1])
    assert index.match(a) == {"e0": 3, "e1": 1}
    index.forget("e0")
    assert index.match(a) == {"e1": 1}
    assert len(index) == 1
