"""kv-aware: one test per decision reason, plus the bookkeeping around them."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from deepinfer_router.routing import reasons
from deepinfer_router.routing.base import Candidate, Decision, RequestFeatures
from deepinfer_router.routing.features import request_features
from deepinfer_router.routing.kv_aware import MAX_HINT_CHUNKS, KvAwareParams, KvAwarePolicy

CHUNK = 64
MODEL = "m"


def feats(text: str, session: str | None = None) -> RequestFeatures:
    return request_features(
        {"prompt": text}, MODEL, session, with_prompt=True, chunk_chars=CHUNK, max_chars=0
    )


def fleet(n: int = 4, **loads: int) -> list[Candidate]:
    """Engines e0..e{n-1}; keyword arguments give in-flight counts (e1=3)."""
    return [
        Candidate(id=f"e{i}", instance="1", inflight=loads.get(f"e{i}", 0),
                  kv_capacity_chars=1_000_000)
        for i in range(n)
    ]


def policy(**kw: object) -> KvAwarePolicy:
    return KvAwarePolicy(KvAwareParams(chunk_chars=CHUNK, **kw))  # type: ignore[arg-type]


def route(p: KvAwarePolicy, f: RequestFeatures, cands: Sequence[Candidate], now: float = 0.0,
          ) -> Decision:
    d = p.select(f, cands, now)
    p.on_routed(f, d, now)
    return d


def place_on(p: KvAwarePolicy, f: RequestFeatures, engine: str, cands: Sequence[Candidate]):
    p.select(f, cands, 0.0)  # registers the engines
    p.on_routed(f, Decision(engine, "test"), 0.0)


SYSTEM = "You are a helpful assistant. " * 300  # ~8,700 chars


def test_prefix_follows_the_engine_holding_it() -> None:
    p = policy()
    cands = fleet()
    place_on(p, feats(SYSTEM + "question one"), "e2", cands)
    d = p.select(feats(SYSTEM + "another question entirely"), cands, 1.0)
    assert d.engine_id == "e2" and d.reason == reasons.PREFIX
    assert d.matched_chars >= len(SYSTEM) - CHUNK


def test_longest_match_wins_at_equal_load() -> None:
    p = policy()
    cands = fleet()
    place_on(p, feats(SYSTEM), "e1", cands)
    place_on(p, feats(SYSTEM + "x" * 2000), "e3", cands)
    d = p.select(feats(SYSTEM + "x" * 2000 + "tail"), cands, 1.0)
    assert (d.engine_id, d.reason) == ("e3", reasons.PREFIX)


def test_spill_when_the_prefix_engine_is_over_its_bound() -> None:
    p = policy()
    long_prompt = SYSTEM * 3  # ~26,000 chars: worth more than its engine's load
    place_on(p, feats(long_prompt), "e0", fleet())
    cands = fleet(e0=3)  # total 3, bound ceil(1.25*4/4)=2: e0 would reach 4
    d = p.select(feats(long_prompt + "more"), cands, 1.0)
    assert d.reason == reasons.SPILL and d.engine_id != "e0"
    p.on_routed(feats(long_prompt + "more"), d, 1.0)
    # the spill engine became a second home for the prefix
    assert d.engine_id in p.index.holders(feats(long_prompt).chunk_hashes[-1])


def test_balance_when_load_outweighs_a_short_match() -> None:
    p = policy()
    short = "s" * 1000  # ~1,000 chars: worth a quarter of a request of load
    place_on(p, feats(short), "e0", fleet(2))
    cands = fleet(2, e0=1)  # e0 is allowed (bound 2) but costlier than the match is worth
    d = p.select(feats(short + "tail"), cands, 1.0)
    assert (d.engine_id, d.reason) == ("e1", reasons.BALANCE)


def test_new_prefix_same_first_chunk_lands_together_even_unrecorded() -> None:
    p = policy()
    cands = fleet(8)
    # no on_routed between them (another router, or a burst): same first chunk, same engine
    a = p.select(feats(SYSTEM + "q1"), cands, 0.0)
    b = p.select(feats(SYSTEM + "q2"), cands, 0.0)
    assert a.reason == b.reason == reasons.NEW_PREFIX
    assert a.engine_id == b.engine_id


def test_new_prefixes_spread_and_avoid_loaded_engines() -> None:
    p = policy()
    cands = fleet(8, e0=2, e1=2)
    chosen = {p.select(feats(f"{i} " * 100), cands, 0.0).engine_id for i in range(64)}
    assert len(chosen) >= 4 and not chosen & {"e0", "e1"}


def test_least_conn_for_prompts_shorter_than_a_chunk() -> None:
    p = policy()
    cands = fleet(3, e0=2, e2=1)
    d = p.select(feats("short"), cands, 0.0)
    assert (d.engine_id, d.reason) == ("e1", reasons.LEAST_CONN)


def test_session_kept_when_no_engine_holds_more_of_the_prompt() -> None:
    p = policy()
    cands = fleet()
    d0 = route(p, feats("hello " * 20, session="s1"), cands)
    # another engine holds an equally long (different) prompt: the binding decides
    place_on(p, feats("other " * 20), "e3" if d0.engine_id != "e3" else "e2", cands)
    d = p.select(feats("hello " * 20 + "turn", session="s1"), cands, 1.0)
    assert (d.engine_id, d.reason) == (d0.engine_id, reasons.SESSION)
    # a prompt nobody holds: the binding still decides (the router's memory of the
    # conversation, e.g. a router restart or chunks not hashed)
    d = p.select(feats("x" * (CHUNK - 1), session="s1"), cands, 1.0)
    assert (d.engine_id, d.reason) == (d0.engine_id, reasons.SESSION)


def test_a_longer_prefix_elsewhere_beats_the_session_binding() -> None:
    """A session key that spans documents (one client asking about many): the engine
    holding this prompt's document wins over the bound one."""
    p = policy()
    cands = fleet()
    d0 = route(p, feats("hello " * 20, session="s1"), cands)
    other = "e3" if d0.engine_id != "e3" else "e2"
    place_on(p, feats(SYSTEM), other, cands)
    d = p.select(feats(SYSTEM + "turn", session="s1"), cands, 1.0)
    assert (d.engine_id, d.reason) == (other, reasons.PREFIX)


def test_empty_session_key_is_no_session() -> None:
    p = policy()
    cands = fleet()
    route(p, feats("hello " * 20, session=""), cands)
    assert len(p.sessions) == 0


def test_conversation_stays_and_new_one_joins_its_system_prompt() -> None:
    p = policy()
    cands = fleet()
    turn = SYSTEM + "user: hi\n"
    first = route(p, feats(turn, "alice"), cands)
    assert first.reason == reasons.NEW_PREFIX
    for i in range(5):
        turn += f"assistant: answer {i}\nuser: question {i}\n"
        d = route(p, feats(turn, "alice"), cands, now=i + 1.0)
        assert (d.engine_id, d.reason) == (first.engine_id, reasons.SESSION)
    d = route(p, feats(SYSTEM + "user: bob here\n", "bob"), cands, now=10.0)
    assert (d.engine_id, d.reason) == (first.engine_id, reasons.PREFIX)


def test_session_spills_over_its_bound_and_is_rebound() -> None:
    p = policy()
    d0 = route(p, feats("x", "s1"), fleet())
    loaded = fleet(**{d0.engine_id: 5})
    d = route(p, feats("x", "s1"), loaded, now=1.0)
    assert d.reason == reasons.SPILL and d.engine_id != d0.engine_id
    d2 = p.select(feats("x", "s1"), fleet(), 2.0)
    assert (d2.engine_id, d2.reason) == (d.engine_id, reasons.SESSION)


def test_session_moves_when_its_engine_is_gone() -> None:
    p = policy()
    d0 = route(p, feats("x", "s1"), fleet())
    rest = [c for c in fleet() if c.id != d0.engine_id]  # ejected or draining
    d = route(p, feats("x", "s1"), rest, now=1.0)
    assert d.engine_id != d0.engine_id and d.reason == reasons.LEAST_CONN
    # back in the fleet: the session stays where it moved
    d2 = p.select(feats("x", "s1"), fleet(), 2.0)
    assert (d2.engine_id, d2.reason) == (d.engine_id, reasons.SESSION)


def test_forget_engine_breaks_bindings_and_cache() -> None:
    p = policy()
    cands = fleet()
    d0 = route(p, feats(SYSTEM, "s1"), cands)
    p.forget_engine(d0.engine_id)
    assert p.index.size(d0.engine_id) == 0
    assert len(p.index) == 0
    d = p.select(feats(SYSTEM + "more", "s1"), cands, 1.0)
    assert d.reason == reasons.NEW_PREFIX  # neither session nor prefix survive


def test_restart_new_instance_clears_the_engine() -> None:
    p = policy()
    cands = fleet()
    place_on(p, feats(SYSTEM), "e1", cands)
    restarted = [
        Candidate(c.id, "2" if c.id == "e1" else c.instance, kv_capacity_chars=1_000_000)
        for c in cands
    ]
    d = p.select(feats(SYSTEM + "q"), restarted, 1.0)
    assert d.reason == reasons.NEW_PREFIX
    assert p.index.size("e1") == 0


def test_session_ttl_expires() -> None:
    p = policy(session_ttl_s=10.0)
    cands = fleet()
    d0 = route(p, feats("x", "s1"), cands, now=0.0)
    assert p.select(feats("x", "s1"), cands, 9.0).reason == reasons.SESSION
    busy = fleet(**{d0.engine_id: 1})  # so that least-conn picks another engine
    d = p.select(feats("x", "s1"), busy, 10.5)
    assert d.reason == reasons.LEAST_CONN


def test_max_sessions_bounds_the_table() -> None:
    p = policy(max_sessions=3)
    cands = fleet()
    for i in range(10):
        route(p, feats("x", f"s{i}"), cands, now=float(i))
    assert len(p.sessions) == 3
    assert p.sessions.get("s9", 10.0) is not None and p.sessions.get("s0", 10.0) is None


def test_cache_estimate_bounded_by_capacity() -> None:
    p = policy()
    small = [Candidate("e0", "1", kv_capacity_chars=CHUNK * 10)]
    for i in range(20):
        route(p, feats(f"{i:04d}" * 100), small)
    assert p.index.size("e0") == 10
    assert p.index.capacity("e0") == 10


def test_unknown_capacity_uses_the_default() -> None:
    p = policy(default_capacity_chars=CHUNK * 7)
    cands = [Candidate("e0", "1")]
    route(p, feats("a" * CHUNK * 20), cands)
    assert p.index.size("e0") == 7


def test_hints_roundtrip_between_routers() -> None:
    a = policy(hint_outbox=16)
    b = policy()
    cands = fleet()
    d = route(a, feats(SYSTEM, "s1"), cands)
    hints = a.export_hints()
    assert len(hints) == 1 and hints[0]["engine"] == d.engine_id
    assert a.export_hints() == []
    known = {c.id: (c.instance, c.kv_capacity_chars) for c in cands}.get
    assert b.import_hints(hints, 0.0, known) == 1
    assert b.import_hints([{"engine": "e0", "instance": "1", "chunk_chars": 999}], 0.0,
                          known) == 0
    assert b.import_hints([{"bogus": 1}], 0.0, known) == 0
    d2 = b.select(feats(SYSTEM + "q"), cands, 1.0)
    assert (d2.engine_id, d2.reason) == (d.engine_id, reasons.PREFIX)
    d3 = b.select(feats("other", "s1"), cands, 1.0)
    assert (d3.engine_id, d3.reason) == (d.engine_id, reasons.SESSION)


def test_hints_only_for_engines_in_the_fleet_and_bounded() -> None:
    cands = fleet()
    known = {c.id: (c.instance, c.kv_capacity_chars) for c in cands}.get
    p = policy()
    chain = feats(SYSTEM).chunk_hashes
    base = {"engine": cands[0].id, "instance": cands[0].instance, "chunk_chars": CHUNK}
    hostile = [
        {**base, "engine": "e-unknown", "hashes": chain, "session": "s-unknown"},
        {**base, "instance": "another-instance", "hashes": chain, "session": "s-old"},
        {**base, "hashes": [str(h) for h in chain]},  # hashes are ints
        {**base, "hashes": "abc"},
        {**base, "session": ["not", "a", "key"]},
        {**base, "engine": ["e0"]},
    ]
    assert p.import_hints(hostile, 0.0, known) == 0
    assert p.engine_ids() == [] and len(p.index) == 0 and len(p.sessions) == 0
    huge = {**base, "hashes": list(range(100_000)), "session": "x" * 100_000}
    assert p.import_hints([huge], 0.0, known) == 1
    assert len(p.index) <= MAX_HINT_CHUNKS and len(p.sessions) == 0
    assert p.engine_ids() == [cands[0].id]


def test_hints_off_by_default() -> None:
    p = policy()
    route(p, feats(SYSTEM), fleet())
    assert p.export_hints() == []


@pytest.mark.parametrize("waiting", [0.0, 3.0])
def test_scraped_waiting_counts_as_load(waiting: float) -> None:
    p = policy()
    cands = fleet(2)
    cands[0].waiting = waiting
    cands[1].inflight = 1
    d = p.select(feats("short"), cands, 0.0)
    assert d.engine_id == ("e0" if waiting == 0 else "e1")


def test_holder_not_a_candidate_is_a_new_placement() -> None:
    p = policy()
    place_on(p, feats(SYSTEM), "e0", fleet())
    without_e0 = [c for c in fleet() if c.id != "e0"]  # draining, or tried already
    d = p.select(feats(SYSTEM + "q"), without_e0, 1.0)
    assert d.reason == reasons.NEW_PREFIX and d.engine_id != "e0"


def test_precise_figures_replace_the_estimate() -> None:
    """Engines with a live KV event feed say what they really hold: an engine the router
    sent the prefix to but that evicted it holds none; one that got the prefix from
    another router holds it all (candidates carry the figure, kv_events/feeds.py)."""
    p = policy()
    cands = fleet()
    place_on(p, feats(SYSTEM + "question one"), "e2", cands)
    ask = feats(SYSTEM + "another question")
    assert p.select(ask, cands, 1.0).engine_id == "e2"  # the estimate alone
    cands = fleet()
    cands[2].precise_cached_chars = 0  # evicted there
    cands[3].precise_cached_chars = len(SYSTEM)  # cached there through another router
    d = p.select(ask, cands, 1.0)
    assert d.engine_id == "e3" and d.reason == reasons.PREFIX
    assert d.matched_chars >= len(SYSTEM) - CHUNK
    # Engines without a figure keep the estimate.
    cands = fleet()
    cands[3].precise_cached_chars = 0
    assert p.select(ask, cands, 1.0).engine_id == "e2"


def test_a_learnt_over_estimate_puts_a_mixed_fleet_on_one_scale() -> None:
    """e2 was sent the whole system prompt (the estimate: all of it held); e3 publishes
    events and really holds 60% of it. As estimated, e2 wins; once grades taught the
    router that e2's estimate is worth a third of what it says, e3's real 60% wins."""
    p = policy()
    cands = fleet()
    place_on(p, feats(SYSTEM + "question one"), "e2", cands)
    ask = feats(SYSTEM + "another question")
    cands = fleet()
    cands[3].precise_cached_chars = len(SYSTEM) * 6 // 10
    assert p.select(ask, cands, 1.0).engine_id == "e2"
    cands = fleet()
    cands[3].precise_cached_chars = len(SYSTEM) * 6 // 10
    cands[2].estimate_factor = 1 / 3
    assert p.select(ask, cands, 1.0).engine_id == "e3"


def test_token_id_prompts_carry_their_ids() -> None:
    f = request_features({"prompt": [1, 2, 3]}, MODEL, None, with_prompt=True,
                         chunk_chars=CHUNK, max_chars=0)
    assert f.prompt_token_ids is not None and list(f.prompt_token_ids) == [1, 2, 3]
    for prompt in ("text", [1, "2"], [True, 2], [], [[1, 2]], [-1]):
        f = request_features({"prompt": prompt}, MODEL, None, with_prompt=True,
                             chunk_chars=CHUNK, max_chars=0)
        assert f.prompt_token_ids is None, prompt


def test_expected_cached_chars_is_the_best_engines_match() -> None:
    """What a waiting request is not charged for (fairness): the longest prefix any
    engine is expected to hold."""
    p = policy()
    cands = fleet()
    assert p.expected_cached_chars(feats(SYSTEM + "first question")) == 0
    route(p, feats(SYSTEM + "first question"), cands)
    held = p.expected_cached_chars(feats(SYSTEM + "another question"))
    assert held >= len(SYSTEM) - CHUNK and held % CHUNK == 0
    assert p.expected_cached_chars(feats("unrelated " * 100)) == 0
