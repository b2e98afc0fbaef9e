"""Embedded registry and admin routes: register, heartbeat TTL, list, delete, drain, keys."""

from __future__ import annotations

import time

import aiohttp

from deepinfer_engine.registration import HttpRegistrar
from deepinfer_router.shared.engine_record import EngineRecord
from deepinfer_router.state import STATE
from tests.support.waiting import wait_until


async def test_register_list_route_and_delete(echo_engines, router):
    a = await echo_engines("a", ["m1"])
    r = await router()
    record = {"url": a.url, "models": ["m1"], "capacity": {"kv_blocks": 100, "block_size": 16}}
    async with aiohttp.ClientSession() as s:
        async with s.post(r.url + "/admin/engines", json={**record, "ttl_s": 30}) as resp:
            assert resp.status == 200, await resp.text()
            engine_id = (await resp.json())["id"]
        async with s.get(r.url + "/admin/engines") as resp:
            listing = await resp.json()
        (entry,) = listing["engines"]
        assert entry["id"] == engine_id and entry["state"] == "healthy"
        assert entry["capacity"]["kv_blocks"] == 100 and entry["inflight"] == 0
        async with s.post(r.url + "/v1/completions", json={"model": "m1", "prompt": "x"}) as resp:
            assert resp.status == 200
            assert resp.headers["x-deepinfer-engine"] == engine_id
        async with s.get(r.url + "/ready") as resp:
            assert resp.status == 200
        async with s.delete(r.url + f"/admin/engines/{engine_id}") as resp:
            assert resp.status == 200
        async with s.post(r.url + "/v1/completions", json={"model": "m1", "prompt": "x"}) as resp:
            assert resp.status == 404  # nobody serves m1 any more
        async with s.get(r.url + "/ready") as resp:
            assert resp.status == 503
            assert (await resp.json())["registry"][0]["backend"] == "local"


async def test_registration_expires_without_heartbeat(echo_engines, router):
    a = await echo_engines("a")
    r = await router()
    async with aiohttp.ClientSession() as s, s.post(
        r.url + "/admin/engines", json={"url": a.url, "models": ["m1"], "ttl_s": 0.5}
    ) as resp:
        assert resp.status == 200
    fleet = r.app[STATE].fleet
    assert len(fleet.engines) == 1
    await wait_until(lambda: not fleet.engines, timeout=3)


async def test_http_registrar_heartbeats_and_deregisters(echo_engines, router):
    a = await echo_engines("a")
    r = await router()
    registrar = HttpRegistrar(r.url, heartbeat_s=0.1, ttl_s=0.4)
    await registrar.start(EngineRecord(url=a.url, models=["m1"]))
    fleet = r.app[STATE].fleet
    # Beats until well past the TTL (0.4 s): the heartbeats alone keep it.
    await wait_until(lambda: registrar.beats >= 8, timeout=10)
    assert len(fleet.engines) == 1
    await registrar.stop()
    assert not fleet.engines  # a clean stop deregisters at once


async def test_restart_with_new_instance_is_seen(echo_engines, router):
    a = await echo_engines("a")
    r = await router()
    forgotten: list[str] = []
    r.app[STATE].fleet.on_forget(forgotten.append)
    async with aiohttp.ClientSession() as s:
        for instance in ("one", "two"):
            async with s.post(r.url + "/admin/engines",
                              json={"url": a.url, "models": ["m1"], "instance": instance}) as resp:
                assert resp.status == 200
    engine = next(iter(r.app[STATE].fleet.engines.values()))
    assert engine.record.instance == "two"
    assert forgotten == [engine.id]


async def test_admin_key_required_and_bad_records_refused(echo_engines, router):
    r = await router(admin_key="sekret")
    async with aiohttp.ClientSession() as s:
        async with s.get(r.url + "/admin/engines") as resp:
            assert resp.status == 401
        auth = {"Authorization": "Bearer sekret"}
        async with s.get(r.url + "/admin/engines", headers=auth) as resp:
            assert resp.status == 200
        for bad in (
            {"url": "ftp://x", "models": ["m"]},
            {"url": "http://169.254.169.254", "models": ["m"]},
            {"url": "http://metadata.google.internal", "models": ["m"]},
            {"models": ["m"]},
            {"url": "http://127.0.0.1:1", "ttl_s": -1},
        ):
            async with s.post(r.url + "/admin/engines", json=bad, headers=auth) as resp:
                assert resp.status == 400, bad
                assert "error" in await resp.json()


async def test_drain_keeps_inflight_and_stops_new(echo_engines, router):
    from tests.support.echo_engine import STATE as ENGINE

    a = await echo_engines("a")
    b = await echo_engines("b")
    a.app[ENGINE].token_delay_s = 0.02
    b.app[ENGINE].token_delay_s = 0.02
    r = await router(engine=[a.url, b.url], policy="least-conn")
    fleet = r.app[STATE].fleet
    await wait_until(lambda: bool(fleet.models(time.monotonic())))
    async with aiohttp.ClientSession() as s:
        resp = await s.post(r.url + "/v1/completions", json={
            "model": "m1", "prompt": "x", "max_tokens": 20, "stream": True})
        drained = resp.headers["x-deepinfer-engine"]
        async with s.post(r.url + f"/admin/engines/{drained}/drain") as d:
            assert (await d.json())["inflight"] == 1
        body = await resp.read()  # the in-flight stream finishes normally
        assert body.endswith(b"data: [DONE]\n\n")
        for _ in range(5):
            async with s.post(r.url + "/v1/completions",
                              json={"model": "m1", "prompt": "x"}) as resp2:
                assert resp2.headers["x-deepinfer-engine"] != drained
