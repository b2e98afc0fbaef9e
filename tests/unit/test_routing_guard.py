"""The bounded-load guard: no engine goes above its bound, whatever the sequence of
requests, sessions, prefixes, completions and engine-side queues."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from deepinfer_router.routing.base import Candidate, RequestFeatures
from deepinfer_router.routing.features import chain_hashes
from deepinfer_router.routing.guard import BoundedLoad, load_limit
from deepinfer_router.routing.kv_aware import KvAwareParams, KvAwarePolicy
from deepinfer_router.routing.session import SessionPolicy

CHUNK = 16
PREFIXES = ["a" * 80, "b" * 80, "a" * 40 + "c" * 60, ""]


def test_limit_formula() -> None:
    assert load_limit(0, 16, 1.25) == 1
    assert load_limit(16, 16, 1.25) == 2  # ceil(1.25*17/16) = ceil(1.328)
    assert load_limit(7, 2, 1.25) == 5  # ceil(1.25*8/2) = 5 exactly, no float drift
    assert load_limit(7, 2, 1.25, slack=2) == 7


@given(
    st.lists(st.integers(min_value=0, max_value=50), min_size=1, max_size=32),
    st.floats(min_value=1.0, max_value=3.0),
)
def test_least_loaded_always_passes(loads: list[int], c: float) -> None:
    cands = [Candidate(f"e{i}", "1", inflight=n) for i, n in enumerate(loads)]
    guard = BoundedLoad(cands, c)
    assert guard.allows(min(cands, key=lambda x: x.load))
    assert guard.limit == math.ceil(c * (sum(loads) + 1) / len(loads) - 1e-9)


ops = st.lists(
    st.tuples(
        st.sampled_from(["req", "req", "req", "done", "queue"]),
        st.integers(min_value=0, max_value=7),  # session / engine / prefix selector
        st.integers(min_value=0, max_value=3),
    ),
    max_size=120,
)


def _run(
    policy: KvAwarePolicy | SessionPolicy,
    n: int,
    seq: list[tuple[str, int, int]],
    c: float,
    slack: int,
) -> None:
    cands = [Candidate(f"e{i}", "1", kv_capacity_chars=CHUNK * 12) for i in range(n)]
    running: list[tuple[RequestFeatures, str]] = []
    now = 0.0
    for op, a, b in seq:
        now += 0.5
        if op == "done" and running:
            feats, eid = running.pop(a % len(running))
            cand = next(x for x in cands if x.id == eid)
            cand.inflight -= 1
            policy.on_complete(feats, eid, True, now)
        elif op == "queue":  # the engine's own queue (other routers' requests) moves
            cands[a % n].waiting = float(b)
        elif op == "req":
            text = PREFIXES[b] + str(a) * 40
            feats = RequestFeatures(
                model="m",
                session_key=f"s{a % 4}" if a < 6 else None,
                chunk_hashes=chain_hashes(text, CHUNK, "m") if policy.needs_prompt else [],
            )
            limit = BoundedLoad(cands, c, slack).limit
            d = policy.select(feats, cands, now)
            chosen = next(x for x in cands if x.id == d.engine_id)
            assert chosen.load + 1 <= limit, (d, [x.load for x in cands], limit)
            policy.on_routed(feats, d, now)
            chosen.inflight += 1
            running.append((feats, chosen.id))


@settings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=1, max_value=6),
    ops,
    st.sampled_from([1.0, 1.1, 1.25, 2.0]),
    st.integers(min_value=0, max_value=2),
)
def test_kv_aware_never_exceeds_the_bound(n: int, seq, c: float, slack: int) -> None:
    policy = KvAwarePolicy(
        KvAwareParams(chunk_chars=CHUNK, balance_factor=c, balance_slack=slack,
                      load_cost_chars=4.0)  # cheap load: affinity pushes hard on the guard
    )
    _run(policy, n, seq, c, slack)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(min_value=1, max_value=6),
    ops,
    st.sampled_from([1.0, 1.25, 2.0]),
    st.integers(min_value=0, max_value=2),
)
def test_session_policy_never_exceeds_the_bound(n: int, seq, c: float, slack: int) -> None:
    _run(SessionPolicy(balance_factor=c, balance_slack=slack), n, seq, c, slack)
