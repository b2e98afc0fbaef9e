"""Tenants' budgets in Redis: two routers sharing one real redis-server take from the
same buckets (a tenant's limit holds across them), places are given back when requests
end, and while Redis is down each router admits alone within its share."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from deepinfer_router.state import STATE
from tests.integration.test_tenants_http import ready
from tests.support.echo_engine import STATE as ECHO
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

KEY = {"Authorization": "Bearer key-team-5c1d"}


async def post(s: aiohttp.ClientSession, url: str, stream: bool = False,
               max_tokens: int = 2) -> tuple[int, str]:
    async with s.post(url + "/v1/chat/completions", headers=KEY, json={
            "model": "m1", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": max_tokens, "stream": stream}) as resp:
        body = await resp.text()
        return resp.status, body


async def two_routers(echo_engines, router, redis_server, **limits):
    a = await echo_engines("a")
    tenants = {"team": {"keys": ["key-team-5c1d"], **limits}}
    routers = [await router(engine=[a.url], redis_url=redis_server.url, tenants=tenants)
               for _ in range(2)]
    for r in routers:
        await ready(r)
    return a, routers


async def test_a_limit_holds_across_routers(echo_engines, router, redis_server):
    _, (r1, r2) = await two_routers(echo_engines, router, redis_server,
                                    requests_per_minute=4)
    async with aiohttp.ClientSession() as s:
        statuses = [(await post(s, r.url))[0] for r in (r1, r2, r1, r2, r1, r2)]
    assert statuses == [200, 200, 200, 200, 429, 429]


async def test_concurrency_places_are_given_back(echo_engines, router, redis_server):
    a, (r1, r2) = await two_routers(echo_engines, router, redis_server, max_concurrency=1)
    a.app[ECHO].token_delay_s = 0.05
    async with aiohttp.ClientSession() as s:
        first = asyncio.create_task(post(s, r1.url, stream=True, max_tokens=20))
        await wait_until(lambda: a.app[ECHO].active == 1)
        status, body = await post(s, r2.url)
        assert status == 429 and '"code":"max_concurrency"' in body
        assert (await first)[0] == 200

        async def admitted() -> bool:
            return (await post(s, r2.url))[0] == 200

        await wait_until(admitted)  # the finish reaches Redis just after the answer


async def test_while_redis_is_down_each_router_admits_alone(echo_engines, router,
                                                            redis_server):
    _, (r1, r2) = await two_routers(echo_engines, router, redis_server,
                                    requests_per_minute=4)
    redis_server.kill()
    async with aiohttp.ClientSession() as s:
        # each router (one worker) alone: its share is the whole limit
        statuses = [(await post(s, r1.url))[0] for _ in range(6)]
        assert statuses == [200] * 4 + [429] * 2
        redis_server.start()

        async def shared_again() -> bool:
            return (await post(s, r2.url))[0] == 200

        await wait_until(shared_again, timeout=10)
    assert r1.app[STATE].budgets is not None


async def test_an_admission_redis_answers_too_late_is_undone(echo_engines, router,
                                                             redis_server):
    """Redis stalls past the gate's timeout: the router admits alone, and the place the
    stalled Redis takes when it wakes up is given back (not held until it expires)."""
    from tests.support.deploy_cluster import redis_client

    _, (r1, _r2) = await two_routers(echo_engines, router, redis_server, max_concurrency=1)
    client = redis_client(redis_server.url)
    try:
        redis_server.pause()  # SIGSTOP: commands wait in the socket until it resumes
        try:
            async with aiohttp.ClientSession() as s:
                assert (await post(s, r1.url))[0] == 200  # admitted alone
            await asyncio.sleep(0.3)
        finally:
            redis_server.resume()

        async def nothing_held() -> bool:
            held = 0
            for key in await client.keys("deepinfer:budget:*:running"):
                held += await client.zcard(key)
            return held == 0

        await wait_until(nothing_held, timeout=10)
    finally:
        await client.aclose()
