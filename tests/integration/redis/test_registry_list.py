"""`deepinfer-engine list --registry`: from Redis and from a router's admin API."""

from __future__ import annotations

import pytest

from deepinfer_engine.redis_registration import RedisRegistrar
from deepinfer_engine.registry_list import list_registered
from tests.support.redis_server import RedisServer, free_port
from tests.support.registry_helpers import make_record

pytestmark = pytest.mark.timeout(20)


async def test_list_from_redis(redis_server: RedisServer) -> None:
    regs = [
        RedisRegistrar(redis_server.url, heartbeat_s=0.5, ttl_s=1.5, namespace="ns1")
        for _ in range(2)
    ]
    other = RedisRegistrar(redis_server.url, heartbeat_s=0.5, ttl_s=1.5, namespace="ns2")
    records = [make_record(9201), make_record(9202)]
    try:
        for reg, record in zip(regs, records, strict=True):
            await reg.start(record)
        await other.start(make_record(9203))
        listed = await list_registered(redis_server.url, namespace="ns1")
        assert [r.id for r in listed] == sorted(r.id for r in records)
        assert listed[0].capacity.kv_blocks == 2048
        assert await list_registered(redis_server.url, namespace="empty") == []
    finally:
        for reg in [*regs, other]:
            await reg.stop()


async def test_list_from_unreachable_redis() -> None:
    with pytest.raises(RuntimeError, match="Redis"):
        await list_registered(f"redis://127.0.0.1:{free_port()}")


async def test_list_from_router(router) -> None:
    """A real router with an admin key, one engine registered through its admin API."""
    import aiohttp

    r = await router(admin_key="adm", health_interval_s=60, scrape_interval_s=60)
    record = make_record(9210)
    async with aiohttp.ClientSession() as s, s.post(
        r.url + "/admin/engines", json=record.model_dump(mode="json"),
        headers={"Authorization": "Bearer adm"},
    ) as resp:
        assert resp.status == 200, await resp.text()
    listed = await list_registered(r.url, key="adm")
    assert [(x.id, x.url) for x in listed] == [(record.id, "http://127.0.0.1:9210")]
    assert listed[0].capacity == record.capacity
    with pytest.raises(RuntimeError, match="401"):
        await list_registered(r.url, key="wrong")


def test_list_rejects_other_schemes() -> None:
    with pytest.raises(ValueError):
        import asyncio

        asyncio.run(list_registered("ftp://x"))
