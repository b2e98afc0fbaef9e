"""kv-aware's cache pressure: a small shared match must not pull a new conversation onto
an engine whose cache is full of live conversations while another has room; a large
match still wins; stale cache costs nothing to evict."""

from __future__ import annotations

import random
from collections.abc import Sequence

from deepinfer_router.routing import reasons
from deepinfer_router.routing.base import Candidate, Decision, RequestFeatures
from deepinfer_router.routing.features import request_features
from deepinfer_router.routing.kv_aware import KvAwareParams, KvAwarePolicy

CHUNK = 64


def feats(text: str, session: str | None = None) -> RequestFeatures:
    return request_features(
        {"prompt": text}, "m", session, with_prompt=True, chunk_chars=CHUNK, max_chars=0
    )


def engines(capacity_chars: int, n: int = 2) -> list[Candidate]:
    return [Candidate(id=f"e{i}", instance="1", kv_capacity_chars=capacity_chars)
            for i in range(n)]


def send(p: KvAwarePolicy, f: RequestFeatures, cands: Sequence[Candidate], now: float) -> Decision:
    """One request at a time: routed, then complete before the next (closed loop)."""
    d = p.select(f, cands, now)
    p.on_routed(f, d, now)
    p.on_complete(f, d.engine_id, True, now)
    return d


def words(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(" abcdefghij") for _ in range(n))


def closed_loop_chat(p: KvAwarePolicy, with_session: bool) -> dict[str, list[str]]:
    """The issue's shape: 7 conversations share a 300-character system prompt, each
    has a 1,200-character context of its own, 4 turns each in shuffled order, over 2
    engines whose caches hold about two thirds of it. Returns conversation -> engines."""
    rng = random.Random(7)
    system = "S" + words(rng, 299)
    history = {c: system + f"conversation {c}:" + words(rng, 1200) for c in range(7)}
    order = [c for c in range(7) for _ in range(4)]
    rng.shuffle(order)
    cands = engines(3_500)
    placed: dict[str, list[str]] = {}
    for t, c in enumerate(order):
        history[c] += " question:" + words(rng, 40)
        d = send(p, feats(history[c], f"conv-{c}" if with_session else None), cands, float(t))
        placed.setdefault(f"conv-{c}", []).append(d.engine_id)
        history[c] += " answer:" + words(rng, 60)
    return placed


def test_low_load_conversations_spread_over_both_caches() -> None:
    for with_session in (True, False):
        placed = closed_loop_chat(KvAwarePolicy(KvAwareParams(chunk_chars=CHUNK)), with_session)
        homes = [turns[0] for turns in placed.values()]
        # both caches are used: 3 or 4 conversations live on each engine
        assert sorted(homes.count(e) for e in ("e0", "e1")) == [3, 4], placed
        if with_session:  # and each conversation keeps its engine
            assert all(len(set(turns)) == 1 for turns in placed.values()), placed


def test_without_pressure_the_shared_prompt_piles_everything_onto_one_engine() -> None:
    """The defect the pressure fixes (the check above can fail): the same shape with the
    pressure terms off sends every conversation where the first one went."""
    p = KvAwarePolicy(KvAwareParams(chunk_chars=CHUNK, eviction_weight=0.0, home_chars=0.0))
    placed = closed_loop_chat(p, with_session=True)
    assert len({e for turns in placed.values() for e in turns}) == 1


def test_a_large_match_still_wins_on_a_full_engine() -> None:
    p = KvAwarePolicy(KvAwareParams(chunk_chars=CHUNK))
    rng = random.Random(1)
    cands = engines(20_000)
    document = "D" + words(rng, 8_000)
    d0 = send(p, feats(document + " q0"), cands, 0.0)
    for t in range(1, 6):  # fill the same engine with live work
        f = feats(f"filler {t}" + words(rng, 2_500))
        p.on_routed(f, Decision(d0.engine_id, "test"), float(t))
        p.on_complete(f, d0.engine_id, True, float(t))
    d = p.select(feats(document + " another question"), cands, 10.0)
    assert (d.engine_id, d.reason) == (d0.engine_id, reasons.PREFIX)


def test_stale_cache_costs_nothing_to_evict() -> None:
    p = KvAwarePolicy(KvAwareParams(chunk_chars=CHUNK))
    rng = random.Random(2)
    cands = engines(4_000)
    full = "F" + words(rng, 6_000)
    for e in ("e0", "e1"):
        p.select(feats(full), cands, 0.0)
        p.on_routed(feats(e + full), Decision(e, "test"), 0.0)
    hot = "H" + words(rng, 4_500)  # more than e1 holds: its whole cache is hot
    # e1's cache is full and reused every other request: its oldest chunk stays live;
    # e0's was last touched long ago (many mean reuse distances)
    p.on_routed(feats(hot), Decision("e1", "test"), 1.0)
    for t in range(60):
        f = feats(hot + f" q{t}")
        held = p.index.match(f.chunk_hashes).get("e1", 0) * CHUNK
        p.on_routed(f, Decision("e1", "test", held), 2.0 + t)
    assert p.mean_reuse_distance is not None and p.mean_reuse_distance < 3
    new = "N" + words(rng, 2_000)
    assert p._pressure("e0", len(new)) < p._pressure("e1", len(new))
    d = p.select(feats(new), cands, 100.0)
    assert d.engine_id == "e0" and d.reason == reasons.NEW_PREFIX
