"""Tenants through HTTP: named keys (--api-key NAME:KEY) name the tenant, plain keys
still work (tenant `default`), X-Priority only lowers the class, --tenant-header names
the tenant when keys are off, and the metric's tenant labels stay bounded to configured
names."""

from __future__ import annotations

import time

import aiohttp
import pytest

from deepinfer_router.state import STATE
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


async def ready(r) -> None:
    fleet = r.app[STATE].fleet
    await wait_until(lambda: bool(fleet.models(time.monotonic())))


async def chat(s: aiohttp.ClientSession, url: str, **headers: str) -> int:
    async with s.post(url + "/v1/chat/completions", headers=headers, json={
            "model": "m1", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2}) as resp:
        await resp.read()
        return resp.status


def tenant_counts(text: str) -> dict[tuple[str, str, str], float]:
    out = {}
    for line in text.splitlines():
        if line.startswith("deepinfer_tenant_requests_total{"):
            labels, value = line[len("deepinfer_tenant_requests_total{"):].rsplit("} ", 1)
            parts = dict(p.split("=", 1) for p in labels.split(","))
            out[(parts["tenant"].strip('"'), parts["class"].strip('"'),
                 parts["status"].strip('"'))] = float(value)
    return out


async def test_named_keys_name_the_tenant_and_x_priority_only_lowers(echo_engines, router):
    a = await echo_engines("a")
    r = await router(engine=[a.url], api_key=["team-a:key-a-1f3e", "key-plain-77c2"])
    await ready(r)
    async with aiohttp.ClientSession() as s:
        assert await chat(s, r.url, Authorization="Bearer key-a-1f3e") == 200
        assert await chat(s, r.url, Authorization="Bearer key-a-1f3e",
                          **{"X-Priority": "batch"}) == 200
        assert await chat(s, r.url, Authorization="Bearer key-a-1f3e",
                          **{"X-Priority": "interactive"}) == 200  # cannot raise
        assert await chat(s, r.url, Authorization="Bearer key-plain-77c2") == 200
        assert await chat(s, r.url, Authorization="Bearer team-a:key-a-1f3e") == 401
        async with s.get(r.url + "/metrics") as resp:
            counts = tenant_counts(await resp.text())
    assert counts == {("team-a", "standard", "200"): 2.0, ("team-a", "batch", "200"): 1.0,
                      ("default", "standard", "200"): 1.0}


async def test_the_tenant_header_names_tenants_when_keys_are_off(echo_engines, router):
    a = await echo_engines("a")
    r = await router(engine=[a.url], tenant_header="X-Tenant")
    await ready(r)
    async with aiohttp.ClientSession() as s:
        for name in ("team-b", "team-c", "not a name!"):
            assert await chat(s, r.url, **{"X-Tenant": name}) == 200
        assert await chat(s, r.url) == 200
        async with s.get(r.url + "/metrics") as resp:
            counts = tenant_counts(await resp.text())
    # no tenant is configured by name: labels stay `default` and `other`
    assert counts == {("other", "standard", "200"): 2.0, ("default", "standard", "200"): 2.0}


async def test_the_tenants_table_sets_keys_and_default_classes(echo_engines, router):
    a = await echo_engines("a")
    r = await router(engine=[a.url], api_key=["key-plain-77c2"], tenants={
        "chat": {"keys": ["key-chat-9a1b"], "class": "interactive", "weight": 3},
        "etl": {"keys": ["key-etl-44d0"], "class": "batch"}})
    await ready(r)
    async with aiohttp.ClientSession() as s:
        assert await chat(s, r.url, Authorization="Bearer key-chat-9a1b") == 200
        assert await chat(s, r.url, Authorization="Bearer key-chat-9a1b",
                          **{"X-Priority": "standard"}) == 200
        assert await chat(s, r.url, Authorization="Bearer key-etl-44d0",
                          **{"X-Priority": "interactive"}) == 200  # cannot raise
        assert await chat(s, r.url, Authorization="Bearer key-plain-77c2") == 200
        async with s.get(r.url + "/metrics") as resp:
            counts = tenant_counts(await resp.text())
    assert counts == {("chat", "interactive", "200"): 1.0, ("chat", "standard", "200"): 1.0,
                      ("etl", "batch", "200"): 1.0, ("default", "standard", "200"): 1.0}
