"""Placement hints shared between two routers' kv-aware policies through a real Redis."""

from __future__ import annotations

import time

import pytest

from deepinfer_router.hint_sharing import RedisHints
from deepinfer_router.routing.base import Candidate, RequestFeatures
from deepinfer_router.routing.features import chain_hashes
from deepinfer_router.routing.kv_aware import KvAwareParams, KvAwarePolicy
from tests.support.redis_server import RedisServer
from tests.support.registry_helpers import wait_for

pytestmark = pytest.mark.timeout(20)

CHUNK = 256


def candidates() -> list[Candidate]:
    return [Candidate(id=f"e{i}", instance=f"i{i}", kv_capacity_chars=10**7) for i in range(4)]


def lookup(engine_id: str) -> tuple[str, int] | None:
    """The fleet of `candidates()`, as the router's hint importer sees it."""
    return {c.id: (c.instance, c.kv_capacity_chars) for c in candidates()}.get(engine_id)


def request(text: str, session: str | None = None) -> RequestFeatures:
    return RequestFeatures(
        model="m", session_key=session, chunk_hashes=chain_hashes(text, CHUNK, "m"),
        prompt_chars=len(text),
    )


async def test_placements_flow_between_routers(redis_server: RedisServer) -> None:
    policies = [KvAwarePolicy(KvAwareParams(chunk_chars=CHUNK, hint_outbox=4096)) for _ in "ab"]
    hints = [RedisHints(redis_server.url, "ns", p, lookup, interval_s=0.05) for p in policies]
    for h in hints:
        await h.start()
    try:
        await wait_for(lambda: all(h.status()["up"] for h in hints), 3)
        a, b = policies
        cands = candidates()
        placed: dict[str, str] = {}
        for n in range(20):
            # Make router A place each prefix somewhere other than B's own first choice
            # would be, by loading the engines differently.
            text = f"document {n} " * 100
            req = request(text, session=f"s{n}")
            for c in cands:
                c.inflight = (n + int(c.id[1:])) % 4
            decision = a.select(req, cands, time.monotonic())
            a.on_routed(req, decision, time.monotonic())
            placed[text] = decision.engine_id
        await wait_for(lambda: hints[1].imported >= 20, 3)
        for c in cands:
            c.inflight = 0
        for text, engine in placed.items():
            decision = b.select(request(text + "next turn " * 10), cands, time.monotonic())
            assert decision.engine_id == engine and decision.matched_chars > 0
        for n, engine in enumerate(placed.values()):
            decision = b.select(request("x", session=f"s{n}"), cands, time.monotonic())
            assert decision.engine_id == engine
        assert hints[0].imported == 0  # a router skips its own hints
    finally:
        for h in hints:
            await h.close()


async def test_new_router_replays_history_and_survives_outage(
    redis_server: RedisServer,
) -> None:
    a = KvAwarePolicy(KvAwareParams(chunk_chars=CHUNK, hint_outbox=4096))
    ha = RedisHints(redis_server.url, "ns", a, lookup, interval_s=0.05)
    await ha.start()
    try:
        cands = candidates()
        req = request("shared prefix " * 100)
        decision = a.select(req, cands, time.monotonic())
        a.on_routed(req, decision, time.monotonic())
        await wait_for(lambda: ha.published == 1, 3)
        # A router started later gets the history.
        b = KvAwarePolicy(KvAwareParams(chunk_chars=CHUNK, hint_outbox=16))
        hb = RedisHints(redis_server.url, "ns", b, lookup, interval_s=0.05)
        await hb.start()
        try:
            await wait_for(lambda: hb.imported == 1, 3)
            redis_server.kill()
            await wait_for(lambda: not hb.status()["up"] and not ha.status()["up"], 5)
            redis_server.start()
            await wait_for(lambda: hb.status()["up"] and ha.status()["up"], 8)
            req2 = request("after restart " * 100)
            d2 = a.select(req2, cands, time.monotonic())
            a.on_routed(req2, d2, time.monotonic())
            await wait_for(lambda: hb.imported == 2, 3)
        finally:
            await hb.close()
    finally:
        await ha.close()


async def test_hints_for_unknown_engines_leave_no_state(redis_server: RedisServer) -> None:
    """Hints naming engines the fleet lacks (gone, or written by anyone with Redis
    access) create no routing state; known ones still apply."""
    import orjson
    import redis.asyncio as aioredis

    writer = aioredis.from_url(redis_server.url)
    chain = chain_hashes("phantom prefix " * 100, CHUNK, "m")
    try:
        for n in range(300):
            phantom = {"engine": f"e-phantom{n}", "instance": "x", "chunk_chars": CHUNK,
                       "hashes": chain, "session": f"s{n}"}
            await writer.xadd("ns:hints", {"r": "other", "h": orjson.dumps([phantom]).decode()})
        real = {"engine": "e1", "instance": "i1", "chunk_chars": CHUNK, "hashes": chain,
                "session": "real"}
        stale = {**real, "instance": "old-instance", "session": "stale"}
        await writer.xadd("ns:hints", {"r": "other", "h": orjson.dumps([real, stale]).decode()})
        policy = KvAwarePolicy(KvAwareParams(chunk_chars=CHUNK))
        hints = RedisHints(redis_server.url, "ns", policy, lookup, interval_s=0.05)
        await hints.start()
        try:
            await wait_for(lambda: hints.status()["up"], 3)
            await wait_for(lambda: hints.imported >= 1, 3)
        finally:
            await hints.close()
    finally:
        await writer.aclose()
    assert hints.imported == 1
    assert policy.engine_ids() == ["e1"]
    assert len(policy.sessions) == 1
