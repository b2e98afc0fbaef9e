"""The session policy and the factory."""

from __future__ import annotations

import pytest

from deepinfer_router.routing import make_policy, reasons
from deepinfer_router.routing.base import Candidate, Decision, RequestFeatures
from deepinfer_router.routing.session import SessionPolicy
from deepinfer_router.settings import RouterSettings


def fleet(n: int = 3, **loads: int) -> list[Candidate]:
    return [Candidate(f"e{i}", "1", inflight=loads.get(f"e{i}", 0)) for i in range(n)]


def req(session: str | None) -> RequestFeatures:
    return RequestFeatures(model="m", session_key=session)


def route(p: SessionPolicy, f: RequestFeatures, cands: list[Candidate], now: float) -> Decision:
    d = p.select(f, cands, now)
    p.on_routed(f, d, now)
    return d


def test_new_then_kept() -> None:
    p = SessionPolicy()
    d0 = route(p, req("s"), fleet(e0=1), 0.0)
    assert d0.reason == reasons.SESSION_NEW and d0.engine_id != "e0"
    d1 = route(p, req("s"), fleet(e0=1), 1.0)
    assert (d1.engine_id, d1.reason) == (d0.engine_id, reasons.SESSION)


def test_no_key_is_least_conn() -> None:
    d = SessionPolicy().select(req(None), fleet(e0=2, e1=1), 0.0)
    assert (d.engine_id, d.reason) == ("e2", reasons.LEAST_CONN)


def test_empty_key_is_no_session() -> None:
    p = SessionPolicy()
    d = route(p, req(""), fleet(e0=2, e1=1), 0.0)
    assert (d.engine_id, d.reason) == ("e2", reasons.LEAST_CONN)
    assert len(p.sessions) == 0


def test_affinity_breaks_on_restart_and_on_forget() -> None:
    """The shared session step: a new instance or a forgotten engine breaks bindings."""
    from deepinfer_router.routing.session_affinity import SessionAffinity

    a = SessionAffinity(ttl_s=60.0, max_sessions=10)
    cands = fleet()
    a.sync(cands)
    a.bind("s", "e1", 0.0)
    assert a.bound("s", cands, 1.0) is cands[1]
    assert a.bound("s", cands, 61.0) is None  # expired
    a.bind("s", "e1", 100.0)
    restarted = [Candidate("e0", "1"), Candidate("e1", "2"), Candidate("e2", "1")]
    a.sync(restarted)
    assert a.bound("s", restarted, 101.0) is None
    a.bind("s", "e1", 102.0)
    assert a.bound("s", restarted, 103.0) is restarted[1]
    assert a.bound("s", [restarted[0]], 103.0) is None  # not a candidate (draining)
    a.forget("e1")
    assert a.bound("s", restarted, 104.0) is None
    a.bind("", "e0", 105.0)
    assert a.bound("", restarted, 106.0) is None and len(a.table) == 1


def test_spill_over_bound_then_rebound() -> None:
    p = SessionPolicy()
    d0 = route(p, req("s"), fleet(), 0.0)
    d1 = route(p, req("s"), fleet(**{d0.engine_id: 4}), 1.0)
    assert d1.reason == reasons.SPILL and d1.engine_id != d0.engine_id
    assert p.select(req("s"), fleet(), 2.0).engine_id == d1.engine_id


def test_engine_gone_restarted_or_forgotten() -> None:
    p = SessionPolicy()
    d0 = route(p, req("s"), fleet(), 0.0)
    others = [c for c in fleet() if c.id != d0.engine_id]
    assert p.select(req("s"), others, 1.0).reason == reasons.SESSION_NEW
    restarted = [Candidate(c.id, "2" if c.id == d0.engine_id else "1") for c in fleet()]
    assert p.select(req("s"), restarted, 1.0).reason == reasons.SESSION_NEW
    d1 = route(p, req("t"), fleet(), 2.0)
    p.forget_engine(d1.engine_id)
    assert p.select(req("t"), fleet(), 3.0).reason == reasons.SESSION_NEW


def test_ttl() -> None:
    p = SessionPolicy(session_ttl_s=5.0)
    route(p, req("s"), fleet(), 0.0)
    assert p.select(req("s"), fleet(), 4.9).reason == reasons.SESSION
    assert p.select(req("s"), fleet(), 5.0).reason == reasons.SESSION_NEW


@pytest.mark.parametrize(
    ("name", "needs_prompt"),
    [("kv-aware", True), ("session", False), ("least-conn", False), ("round-robin", False)],
)
def test_factory(name: str, needs_prompt: bool) -> None:
    policy = make_policy(RouterSettings.model_validate({"policy": name}))
    assert policy.name == name and policy.needs_prompt is needs_prompt
    d = policy.select(req("s"), fleet(), 0.0)
    assert d.engine_id in {"e0", "e1", "e2"}
    assert d.reason in reasons.ALL


def test_factory_passes_parameters() -> None:
    s = RouterSettings.model_validate(
        {"prefix_chunk_chars": 256, "balance_factor": 2.0, "default_engine_kv_tokens": 1000,
         "chars_per_token": 3.0}
    )
    policy = make_policy(s)
    params = policy.params  # type: ignore[attr-defined]
    assert params.chunk_chars == 256 and params.balance_factor == 2.0
    assert params.default_capacity_chars == 3000


def test_bindings_travel_as_hints_to_another_router() -> None:
    """Several routers (or --workers) with the session policy keep one binding: a new
    or moved binding is exported, and another router binds the session alike."""
    a, b = SessionPolicy(hint_outbox=16), SessionPolicy()
    cands = fleet()
    d = route(a, req("s1"), cands, 0.0)
    route(a, req("s1"), cands, 1.0)  # kept: nothing new to tell
    hints = a.export_hints()
    assert hints == [{"engine": d.engine_id, "instance": "1", "session": "s1"}]
    known = {c.id: (c.instance, 0) for c in cands}.get
    assert b.import_hints(hints, 2.0, known) == 1
    # an engine the fleet lacks, another instance, or a malformed hint: ignored
    assert b.import_hints([{"engine": "e9", "instance": "1", "session": "x"},
                           {"engine": "e0", "instance": "2", "session": "x"},
                           {"engine": "e0", "instance": "1", "session": 5}], 2.0, known) == 0
    d2 = b.select(req("s1"), fleet(**{d.engine_id: 0}), 3.0)
    assert (d2.engine_id, d2.reason) == (d.engine_id, reasons.SESSION)


def test_session_hints_off_by_default() -> None:
    p = SessionPolicy()
    route(p, req("s1"), fleet(), 0.0)
    assert p.export_hints() == []
