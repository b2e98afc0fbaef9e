"""`deepinfer-engine list --registry`: from Redis and from a router's admin API."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from engines.redis_registration import RedisRegistrar
from engines.registry_list import list_registered
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


@pytest.fixture
async def fake_router() -> AsyncIterator[str]:
    """A stand-in for the router's GET /admin/engines (record fields + router state)."""
    record = make_record(9210)

    async def engines(request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != "Bearer adm":
            return web.json_response({"error": {"message": "no"}}, status=401)
        item = {**record.model_dump(mode="json"), "state": "healthy", "inflight": 0}
        return web.json_response({"engines": [item], "registry": []})

    app = web.Application()
    app.router.add_get("/admin/engines", engines)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_list_from_router(fake_router: str) -> None:
    listed = await list_registered(fake_router, key="adm")
    assert [r.url for r in listed] == ["http://127.0.0.1:9210"]
    with pytest.raises(RuntimeError, match="401"):
        await list_registered(fake_router, key="wrong")


def test_list_rejects_other_schemes() -> None:
    with pytest.raises(ValueError):
        import asyncio

        asyncio.run(list_registered("ftp://x"))
