"""kv-aware: in-flight uncached prefill work counts as load (prefill_load_chars)."""

from __future__ import annotations

import random

import pytest

from deepinfer_router.routing import reasons
from deepinfer_router.routing.base import Candidate, Decision, RequestFeatures
from deepinfer_router.routing.features import request_features
from deepinfer_router.routing.kv_aware import KvAwareParams, KvAwarePolicy

CHUNK = 64
MODEL = "m"
HOT = "You are the hot system prompt. " * 400  # ~12,000 chars


def feats(text: str, session: str | None = None) -> RequestFeatures:
    return request_features(
        {"prompt": text}, MODEL, session, with_prompt=True, chunk_chars=CHUNK, max_chars=0
    )


def cold(i: int, chars: int = 8000) -> RequestFeatures:
    rng = random.Random(i)
    return feats("".join(rng.choice("abcdefghij ") for _ in range(chars)))


def policy(**kw: object) -> KvAwarePolicy:
    kw.setdefault("balance_slack", 2)  # the router default
    return KvAwarePolicy(KvAwareParams(chunk_chars=CHUNK, **kw))  # type: ignore[arg-type]


class Fleet:
    """Candidates whose in-flight counts follow on_routed/on_complete, as the router's."""

    def __init__(self, n: int = 4) -> None:
        self.inflight = {f"e{i}": 0 for i in range(n)}

    def cands(self) -> list[Candidate]:
        return [Candidate(id=e, instance="1", inflight=k, kv_capacity_chars=1_000_000)
                for e, k in self.inflight.items()]

    def route(self, p: KvAwarePolicy, f: RequestFeatures, engine: str | None = None
              ) -> Decision:
        d = p.select(f, self.cands(), 0.0)
        if engine is not None:
            d = Decision(engine, d.reason, 0)
        p.on_routed(f, d, 0.0)
        self.inflight[d.engine_id] += 1
        return d

    def done(self, p: KvAwarePolicy, f: RequestFeatures, engine: str) -> None:
        self.inflight[engine] -= 1
        p.on_complete(f, engine, True, 1.0)


def test_hot_engine_with_cached_requests_takes_a_cold_prompt() -> None:
    p = policy()
    fl = Fleet()
    first = feats(HOT + "first")
    fl.route(p, first, "e0")
    fl.done(p, first, "e0")  # e0 now holds the hot prefix
    hot = [feats(HOT + f"question {i}") for i in range(3)]
    for f in hot:
        d = fl.route(p, f)
        assert d.engine_id == "e0" and d.reason == reasons.PREFIX
    # three engines busy with one expensive cold prompt each; e0 has 3 cheap requests
    for i, e in enumerate(("e1", "e2", "e3")):
        fl.route(p, cold(i, 12000), e)
    assert fl.inflight == {"e0": 3, "e1": 1, "e2": 1, "e3": 1}
    assert p.pending_chars("e0") < p.pending_chars("e1")
    d = p.select(cold(99), fl.cands(), 0.0)
    assert d.engine_id == "e0" and d.reason == reasons.NEW_PREFIX
    # counting requests only, the same state sends it to a cold engine
    p0 = policy(prefill_load_chars=0)
    fl0 = Fleet()
    fl0.route(p0, first, "e0")
    fl0.done(p0, first, "e0")
    for f in hot:
        fl0.route(p0, f)
    for i, e in enumerate(("e1", "e2", "e3")):
        fl0.route(p0, cold(i, 12000), e)
    assert p0.select(cold(99), fl0.cands(), 0.0).engine_id != "e0"
    assert p0.pending_chars("e1") == 0


def test_amounts_are_expected_uncached_chars_and_released_exactly() -> None:
    p = policy()
    fl = Fleet()
    first = feats(HOT + "first")
    fl.route(p, first, "e2")
    assert p.pending_chars("e2") == first.prompt_chars  # nothing cached: all of it
    second = feats(HOT + "a second question")
    d = fl.route(p, second)
    assert d.engine_id == "e2" and d.matched_chars > 0
    assert p.pending_chars("e2") == first.prompt_chars + second.prompt_chars - d.matched_chars
    fl.done(p, first, "e2")
    assert p.pending_chars("e2") == second.prompt_chars - d.matched_chars
    fl.done(p, first, "e2")  # a second completion of the same request releases nothing
    assert p.pending_chars("e2") == second.prompt_chars - d.matched_chars
    p.on_complete(second, "e1", True, 1.0)  # wrong engine: nothing
    assert p.pending_chars("e2") == second.prompt_chars - d.matched_chars
    fl.done(p, second, "e2")
    assert p.pending_chars("e2") == 0
    assert all(not eng.inflight for eng in p._engines.values())


def test_many_requests_release_to_zero() -> None:
    p = policy()
    fl = Fleet()
    rng = random.Random(3)
    live: list[tuple[RequestFeatures, str]] = []
    for i in range(200):
        f = feats(HOT + f"q{i}") if rng.random() < 0.5 else cold(i, rng.randrange(100, 9000))
        live.append((f, fl.route(p, f).engine_id))
        if rng.random() < 0.6:
            f, e = live.pop(rng.randrange(len(live)))
            fl.done(p, f, e)
        assert all(p.pending_chars(e) >= 0 for e in fl.inflight)
    for f, e in live:
        fl.done(p, f, e)
    assert all(p.pending_chars(e) == 0 for e in fl.inflight)
    assert all(not eng.inflight for eng in p._engines.values())


def test_retry_of_the_same_request_replaces_its_amount() -> None:
    p = policy()
    fl = Fleet()
    f = cold(1, 5000)
    fl.route(p, f, "e1")
    p.on_routed(f, Decision("e1", "test"), 0.0)  # routed again without a completion
    assert p.pending_chars("e1") == f.prompt_chars
    p.on_complete(f, "e1", False, 1.0)
    assert p.pending_chars("e1") == 0


def test_forget_engine_and_restart_clear_pending() -> None:
    p = policy()
    fl = Fleet()
    f, g = cold(1, 5000), cold(2, 3000)
    fl.route(p, f, "e1")
    fl.route(p, g, "e1")
    p.forget_engine("e1")
    assert p.pending_chars("e1") == 0
    p.select(cold(3), fl.cands(), 0.0)  # comes back
    p.on_complete(f, "e1", True, 1.0)  # completion of a request from before: no effect
    assert p.pending_chars("e1") == 0
    h = cold(4, 2000)
    fl.route(p, h, "e1")
    restarted = [Candidate(id=c.id, instance="2" if c.id == "e1" else c.instance,
                           inflight=c.inflight, kv_capacity_chars=c.kv_capacity_chars)
                 for c in fl.cands()]
    p.select(cold(5), restarted, 0.0)  # new instance of e1
    assert p.pending_chars("e1") == 0
    p.on_complete(g, "e1", True, 1.0)
    p.on_complete(h, "e1", True, 1.0)
    assert p.pending_chars("e1") == 0


def test_pending_of_the_matched_prefix_does_not_push_a_request_away() -> None:
    """A big new prefix is still prefilling on e0: the next request with the same prefix
    waits for it there rather than recomputing it on an idle engine."""
    p = policy()
    fl = Fleet()
    d0 = fl.route(p, feats(HOT + "first"))
    d1 = fl.route(p, feats(HOT + "second"))
    assert d1.engine_id == d0.engine_id and d1.reason == reasons.PREFIX


def test_off_counts_requests_only() -> None:
    p = policy(prefill_load_chars=0)
    fl = Fleet()
    fl.route(p, cold(1), "e1")
    assert p.pending_chars("e1") == 0
    assert not p._engines["e1"].inflight


def test_negative_prefill_load_chars_rejected() -> None:
    with pytest.raises(ValueError):
        policy(prefill_load_chars=-1.0)


def test_first_token_releases_the_prefill_and_completion_releases_nothing_more() -> None:
    p = policy()
    fl = Fleet()
    a, b = cold(1, 6000), cold(2, 3000)
    fl.route(p, a, "e1")
    fl.route(p, b, "e1")
    assert p.pending_chars("e1") == a.prompt_chars + b.prompt_chars
    p.on_first_token(a, "e1", 0.5)  # a's prompt is prefilled: only b's is pending
    assert p.pending_chars("e1") == b.prompt_chars
    p.on_first_token(a, "e1", 0.6)  # a second first token releases nothing
    p.on_first_token(b, "e2", 0.6)  # wrong engine: nothing
    assert p.pending_chars("e1") == b.prompt_chars
    fl.done(p, a, "e1")
    assert p.pending_chars("e1") == b.prompt_chars
    fl.done(p, b, "e1")  # b never streamed: released at completion
    assert p.pending_chars("e1") == 0
    assert all(not eng.inflight for eng in p._engines.values())


def test_decoding_requests_cost_less_than_prefilling_ones() -> None:
    """Two engines with as many requests in flight: the one whose requests are past
    prefill (streaming tokens) takes a cold prompt before the one still prefilling."""
    p = policy()
    fl = Fleet(2)
    decoding = [cold(10 + i, 8000) for i in range(2)]
    for f in decoding:
        fl.route(p, f, "e0")
        p.on_first_token(f, "e0", 0.2)
    for i in range(2):
        fl.route(p, cold(20 + i, 8000), "e1")
    assert fl.inflight == {"e0": 2, "e1": 2}
    assert p.select(cold(99), fl.cands(), 0.3).engine_id == "e0"
