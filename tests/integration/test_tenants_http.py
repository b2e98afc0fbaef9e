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
            text = await resp.text()
    counts = tenant_counts(text)
    assert counts == {("chat", "interactive", "200"): 1.0, ("chat", "standard", "200"): 1.0,
                      ("etl", "batch", "200"): 1.0, ("default", "standard", "200"): 1.0}
    # tokens from each answer's usage (the echo engine reports 3 prompt tokens and
    # max_tokens completion tokens, no cached tokens)
    assert 'deepinfer_tenant_tokens_total{kind="prompt",tenant="chat"} 6.0' in text
    assert 'deepinfer_tenant_tokens_total{kind="completion",tenant="chat"} 4.0' in text
    assert 'kind="cached"' not in text


async def test_the_class_reaches_engines_that_schedule_by_priority(echo_engines, router):
    """--engine-priority labelled: only an engine registered with the label
    scheduling-policy=priority gets vLLM's `priority` (vLLM refuses one otherwise); the
    client's own priority is overridden."""
    plain, prio = await echo_engines("plain"), await echo_engines("prio")
    r = await router(policy="round-robin", tenants={
        "etl": {"keys": ["key-etl-44d0"], "class": "batch"}})
    async with aiohttp.ClientSession() as s:
        for engine, labels in ((plain, {}), (prio, {"scheduling-policy": "priority"})):
            async with s.post(r.url + "/admin/engines", json={
                    "url": engine.url, "models": ["m1"], "labels": labels,
                    "ttl_s": 60}) as resp:
                assert resp.status in (200, 201), await resp.text()
        await wait_until(lambda: len(r.app[STATE].fleet.candidates(
            "m1", time.monotonic())) == 2)
        for _ in range(4):
            async with s.post(r.url + "/v1/chat/completions",
                              headers={"Authorization": "Bearer key-etl-44d0"},
                              json={"model": "m1", "max_tokens": 1, "priority": -10,
                                    "messages": [{"role": "user", "content": "x"}]}) as resp:
                assert resp.status == 200
    from tests.support.echo_engine import STATE as ECHO
    assert [b["priority"] for b in prio.app[ECHO].received] == [2, 2]  # batch: third class
    assert [b["priority"] for b in plain.app[ECHO].received] == [-10, -10]  # as sent


async def test_engine_priority_all_and_off(echo_engines, router):
    from tests.support.echo_engine import STATE as ECHO
    a = await echo_engines("a")
    for mode, want in (("all", [0, 2]), ("off", [None, None])):
        r = await router(engine=[a.url], engine_priority=mode, api_key=["chat:key-c-1d2e"],
                         tenants={"chat": {"class": "interactive"}})
        await ready(r)
        a.app[ECHO].received.clear()
        async with aiohttp.ClientSession() as s:
            assert await chat(s, r.url, Authorization="Bearer key-c-1d2e") == 200
            assert await chat(s, r.url, Authorization="Bearer key-c-1d2e",
                              **{"X-Priority": "batch"}) == 200
        assert [b.get("priority") for b in a.app[ECHO].received] == want
