"""Tenants' budgets through HTTP: each kind of limit answers 429 in the OpenAI shape with
Retry-After and x-ratelimit-* headers, admitted answers carry the headers too, a client
that leaves gives its place back, and refusals are counted by tenant and limit."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from deepinfer_router.state import STATE
from tests.integration.test_tenants_http import ready
from tests.support.echo_engine import STATE as ECHO
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

KEY = "Bearer key-team-5c1d"


async def post(s: aiohttp.ClientSession, url: str, max_tokens: int = 2,
               stream: bool = False, content: str = "hi"
               ) -> tuple[int, dict, aiohttp.typedefs.LooseHeaders]:
    async with s.post(url + "/v1/chat/completions", headers={"Authorization": KEY}, json={
            "model": "m1", "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "stream": stream}) as resp:
        body = await resp.read()
        return resp.status, (await resp.json() if resp.status != 200 or not stream
                             else {"raw": body}), resp.headers


def assert_refused(status: int, body: dict, headers, limit: str) -> None:
    assert status == 429
    err = body["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == limit
    assert "tenant team" in err["message"] and "Retry after" in err["message"]
    assert int(headers["Retry-After"]) >= 1


async def budgeted_router(echo_engines, router, **limits):
    a = await echo_engines("a")
    r = await router(engine=[a.url], tenants={"team": {"keys": ["key-team-5c1d"], **limits}})
    await ready(r)
    return a, r


async def test_requests_per_minute(echo_engines, router):
    _, r = await budgeted_router(echo_engines, router, requests_per_minute=2)
    async with aiohttp.ClientSession() as s:
        status, _, headers = await post(s, r.url)
        assert status == 200
        assert headers["x-ratelimit-limit-requests"] == "2"
        assert headers["x-ratelimit-remaining-requests"] == "1"
        assert (await post(s, r.url))[0] == 200
        status, body, headers = await post(s, r.url)
        assert_refused(status, body, headers, "requests_per_minute")
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert int(headers["Retry-After"]) in range(29, 32)  # one request refills in 30 s
        async with s.get(r.url + "/metrics") as resp:
            text = await resp.text()
    assert ('deepinfer_tenant_budget_rejected_total{limit="requests_per_minute",'
            'tenant="team"} 1.0') in text


async def test_tokens_per_minute_with_usage_correction(echo_engines, router):
    _, r = await budgeted_router(echo_engines, router, tokens_per_minute=200)
    budgets = r.app[STATE].budgets.budgets  # the one-process gate's

    def remaining() -> int:
        room = budgets.headroom("team", time.monotonic())
        assert room.tokens is not None
        return room.tokens[1]

    async with aiohttp.ClientSession() as s:
        # estimated at ~150 tokens (400 characters of prompt + max_tokens 50), the
        # answer reports 3 + 50 used: the other ~97 come back
        status, _, headers = await post(s, r.url, max_tokens=50, content="x" * 400)
        assert status == 200
        assert int(headers["x-ratelimit-remaining-tokens"]) in range(45, 56)
        assert 147 <= remaining() <= 152
        status, body, headers = await post(s, r.url, max_tokens=190)
        assert_refused(status, body, headers, "tokens_per_minute")
        status, _, _ = await post(s, r.url, max_tokens=100)
        assert status == 200
        assert 44 <= remaining() <= 52


async def test_concurrency_and_a_client_that_leaves(echo_engines, router):
    a, r = await budgeted_router(echo_engines, router, max_concurrency=1)
    a.app[ECHO].token_delay_s = 0.05
    async with aiohttp.ClientSession() as s:
        first = asyncio.create_task(post(s, r.url, max_tokens=20, stream=True))
        await wait_until(lambda: a.app[ECHO].active == 1)
        status, body, headers = await post(s, r.url)
        assert_refused(status, body, headers, "max_concurrency")
        assert (await first)[0] == 200
        assert (await post(s, r.url))[0] == 200  # its place was given back
        # a client that leaves mid-stream gives its place back too
        leaving = asyncio.create_task(post(s, r.url, max_tokens=200, stream=True))
        await wait_until(lambda: a.app[ECHO].active == 1)
        leaving.cancel()
        await wait_until(lambda: a.app[ECHO].active == 0)
        await wait_until(lambda: r.app[STATE].admission.inflight == 0)
        assert (await post(s, r.url))[0] == 200


async def test_tenants_without_budgets_pass_untouched(echo_engines, router):
    a = await echo_engines("a")
    r = await router(engine=[a.url], tenants={
        "team": {"keys": ["key-team-5c1d"], "requests_per_minute": 1},
        "free": {"keys": ["key-free-0a9e"]}})
    await ready(r)
    async with aiohttp.ClientSession() as s:
        for _ in range(5):
            async with s.post(r.url + "/v1/chat/completions",
                              headers={"Authorization": "Bearer key-free-0a9e"},
                              json={"model": "m1", "max_tokens": 1,
                                    "messages": [{"role": "user", "content": "x"}]}) as resp:
                assert resp.status == 200
                assert "x-ratelimit-limit-requests" not in resp.headers


async def test_a_stream_settles_its_token_budget_without_showing_the_usage(
        echo_engines, router):
    """The client did not ask for usage: the router asks the engine for it, settles the
    tenant's token budget by it, and the client's stream has no usage event."""
    a, r = await budgeted_router(echo_engines, router, tokens_per_minute=1000)
    budgets = r.app[STATE].budgets.budgets
    async with aiohttp.ClientSession() as s:
        status, body, _ = await post(s, r.url, max_tokens=40, stream=True, content="x" * 800)
        assert status == 200
        raw = body["raw"]
        assert b'"usage"' not in raw and raw.endswith(b"data: [DONE]\n\n")
        assert raw.count(b"data: ") == 41  # 40 tokens and [DONE]
    assert a.app[ECHO].received[-1]["stream_options"] == {"include_usage": True}
    room = budgets.headroom("team", time.monotonic())
    # charged ~240 (800 characters + 40), settled at 3 + 40 used
    assert room.tokens is not None and 950 <= room.tokens[1] <= 960
