"""Records in a shared Redis get the same checks as `POST /admin/engines`, and never take
over an engine another source (`--engine`) owns, whatever id they claim."""

from __future__ import annotations

import time

import aiohttp
import pytest

from deepinfer_router.shared import redis_store as store
from deepinfer_router.shared.engine_record import EngineRecord
from deepinfer_router.state import STATE
from tests.support.echo_engine import STATE as ENGINE
from tests.support.redis_server import RedisServer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(30)


async def test_redis_records_checked_and_never_replace_a_static_engine(
    redis_server: RedisServer, echo_engines, router
) -> None:
    a = await echo_engines("a")
    b = await echo_engines("b")
    r = await router(engine=[a.url], redis_url=redis_server.url, registry_namespace="sec")
    fleet = r.app[STATE].fleet
    await wait_until(lambda: bool(fleet.models(time.monotonic())))
    (static_id,) = fleet.engines
    keys = store.Keys("sec")
    client = store.connect(redis_server.url)
    try:
        # The static engine's id (a hash of its URL anyone can compute) with B's URL.
        hijack = EngineRecord(id=static_id, url=b.url, models=["m1"])
        metadata = EngineRecord(url="http://169.254.169.254", models=["m1"])
        mapped = EngineRecord(url="http://[64:ff9b::a9fe:a9fe]:80", models=["m1"])
        honest = EngineRecord(url=b.url, models=["m1"])
        for record in (hijack, metadata, mapped, honest):
            await store.write_record(client, keys, record, 30, announce=True)
        await wait_until(lambda: honest.id in fleet.engines, timeout=5)
    finally:
        await client.aclose()
    assert fleet.engines[static_id].record.url == a.url
    assert fleet.engines[static_id].source == "static"
    assert metadata.id not in fleet.engines and mapped.id not in fleet.engines
    routed: list[str] = []
    async with aiohttp.ClientSession() as s:
        for _ in range(6):
            async with s.post(r.url + "/v1/completions", json={
                "model": "m1", "prompt": "x", "max_tokens": 1
            }) as resp:
                assert resp.status == 200
                routed.append(resp.headers["x-deepinfer-engine"])
    assert set(routed) <= {static_id, honest.id}
    # What was routed to the static id reached A, the URL its operator gave.
    assert len(a.app[ENGINE].received) == routed.count(static_id)
    assert len(b.app[ENGINE].received) == routed.count(honest.id)
