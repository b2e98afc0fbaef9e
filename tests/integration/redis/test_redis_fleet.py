"""Two routers and three simulated engines wired only through a real Redis, as processes:
Redis killed and restarted under load, an engine SIGKILLed under load, routers agreeing.

Engines use the default registration timing (heartbeat 2 s, TTL 6 s)."""

from __future__ import annotations

import asyncio
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from deepinfer_engine.registration import DEFAULT_TTL_S
from deepinfer_router.shared import redis_store as store
from tests.support.procs import Proc, Procs
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

CHAT = "/v1/chat/completions"


@dataclass
class Fleet:
    redis: RedisServer
    sims: list[Proc]
    routers: list[Proc]
    ids: dict[int, str] = field(default_factory=dict)  # sim port -> engine id


async def engine_ids(http: aiohttp.ClientSession, router: Proc) -> set[str]:
    async with http.get(router.url + "/admin/engines") as resp:
        assert resp.status == 200
        return {e["id"] for e in (await resp.json())["engines"]}


async def ready_detail(http: aiohttp.ClientSession, router: Proc) -> tuple[int, Any]:
    async with http.get(router.url + "/ready") as resp:
        return resp.status, await resp.json()


@pytest.fixture
async def fleet(
    redis_server: RedisServer, procs: Procs, http: aiohttp.ClientSession
) -> Fleet:
    sims = [
        procs.sim("--registry", redis_server.url, "--speed", "20", "--kv-blocks", "4096")
        for _ in range(3)
    ]
    routers = [procs.router("--redis-url", redis_server.url) for _ in range(2)]
    await asyncio.gather(*(p.wait_healthy() for p in [*sims, *routers]))

    async def all_seen() -> bool:
        sets = [await engine_ids(http, r) for r in routers]
        return all(len(s) == 3 for s in sets) and sets[0] == sets[1]

    await wait_until(all_seen, 10)
    r = store.connect(redis_server.url)
    try:
        found = await store.read_all(r, store.Keys("deepinfer"))
    finally:
        await r.aclose()
    ids = {int(s.record.url.rsplit(":", 1)[1]): s.record.id for s in found.values()}
    return Fleet(redis_server, sims, routers, ids)


@dataclass
class Load:
    """Clients sending chat requests round-robin over the routers until stopped."""

    http: aiohttp.ClientSession
    routers: list[Proc]
    clients: int = 6
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    served: list[tuple[float, float, str]] = field(default_factory=list)  # start, end, engine
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]

    async def _client(self, i: int) -> None:
        n = 0
        while not self._stop.is_set():
            router = self.routers[(i + n) % len(self.routers)]
            body = {
                "model": "sim-model",
                "messages": [{"role": "user", "content": f"client {i} turn {n} " * 20}],
                "max_tokens": 4,
            }
            t0 = time.monotonic()
            try:
                async with self.http.post(router.url + CHAT, json=body) as resp:
                    await resp.read()
                    if resp.status == 200:
                        self.ok += 1
                        engine = resp.headers.get("x-deepinfer-engine", "")
                        self.served.append((t0, time.monotonic(), engine))
                    else:
                        self.failures.append(f"{resp.status} via {router.url}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                self.failures.append(f"{type(exc).__name__}: {exc}")
            n += 1

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)


async def test_two_routers_three_engines_serve_through_redis(
    fleet: Fleet, http: aiohttp.ClientSession
) -> None:
    load = Load(http, fleet.routers)
    load.start()
    await wait_until(lambda: load.ok > 20 or bool(load.failures), 30)
    await load.stop()
    assert not load.failures
    assert load.ok > 20
    assert {engine for _, _, engine in load.served} <= set(fleet.ids.values())
    for router in fleet.routers:
        status, detail = await ready_detail(http, router)
        assert status == 200
        assert next(s for s in detail["registry"] if s["backend"] == "redis")["up"] is True


async def test_redis_killed_and_restarted_under_load(
    fleet: Fleet, http: aiohttp.ClientSession
) -> None:
    load = Load(http, fleet.routers)
    load.start()
    try:
        await wait_until(lambda: load.ok >= 10, 30)
        ok_before = load.ok
        fleet.redis.kill()

        async def registry_down_everywhere() -> bool:
            for router in fleet.routers:
                status, detail = await ready_detail(http, router)
                assert status == 200  # stays ready on the last known engines
                redis = next(s for s in detail["registry"] if s["backend"] == "redis")
                if redis["up"]:
                    return False
            return True

        await wait_until(registry_down_everywhere, 10)
        ok_down = load.ok
        await wait_until(lambda: load.ok >= ok_down + 20, 30)  # traffic keeps flowing
        assert load.ok > ok_before
        for router in fleet.routers:
            assert await engine_ids(http, router) == set(fleet.ids.values())

        fleet.redis.start()
        r = store.connect(fleet.redis.url)
        try:

            async def engines_back() -> bool:
                found = await store.read_all(r, store.Keys("deepinfer"))
                return set(found) == set(fleet.ids.values())

            await wait_until(engines_back, 30)  # the engines' own heartbeats re-register
        finally:
            await r.aclose()

        async def registry_up_everywhere() -> bool:
            for router in fleet.routers:
                _, detail = await ready_detail(http, router)
                redis = next(s for s in detail["registry"] if s["backend"] == "redis")
                if not redis["up"] or redis.get("in_grace"):
                    return False
            return True

        await wait_until(registry_up_everywhere, 10)
        ok_up = load.ok
        await wait_until(lambda: load.ok >= ok_up + 10, 30)
    finally:
        await load.stop()
    assert not load.failures, load.failures[:5]
    for router in fleet.routers:
        assert await engine_ids(http, router) == set(fleet.ids.values())


async def test_engine_sigkill_leaves_routing_within_ttl(
    fleet: Fleet, http: aiohttp.ClientSession
) -> None:
    victim = fleet.sims[0]
    victim_id = fleet.ids[victim.port]
    load = Load(http, fleet.routers)
    load.start()
    try:
        await wait_until(lambda: load.ok >= 10, 30)
        victim.signal(signal.SIGKILL)

        async def gone_everywhere() -> bool:
            for router in fleet.routers:
                if victim_id in await engine_ids(http, router):
                    return False
            return True

        # Its record expires (no heartbeat after the kill) and every router drops it.
        await wait_until(gone_everywhere, DEFAULT_TTL_S + 30)
        ok_gone = load.ok
        await wait_until(lambda: load.ok >= ok_gone + 20, 30)  # traffic after the removal
        served_after = [engine for _, _, engine in load.served[ok_gone:]]
        assert victim_id not in served_after
    finally:
        await load.stop()
