"""Engine-side registration into a real redis-server."""

from __future__ import annotations

import logging
from typing import Any

import orjson
import pytest
import redis.asyncio as aioredis

from deepinfer_engine.redis_registration import RedisRegistrar
from deepinfer_engine.registration import make_registrar
from deepinfer_router.shared import redis_store as store
from tests.support.redis_server import RedisServer, free_port
from tests.support.registry_helpers import make_record, wait_for, wait_for_async

pytestmark = pytest.mark.timeout(20)

NS = "t"


def client(server: RedisServer) -> Any:
    """A plain client for inspecting the store (Any: redis-py's sync/async union types)."""
    return aioredis.Redis.from_url(server.url, decode_responses=True)


async def test_start_writes_full_record_with_ttl_index_and_event(
    redis_server: RedisServer,
) -> None:
    record = make_record(9001)
    reg = RedisRegistrar(redis_server.url, heartbeat_s=0.2, ttl_s=0.6, namespace=NS)
    await reg.start(record)
    r = client(redis_server)
    try:
        keys = store.Keys(NS)
        raw = await r.hgetall(keys.engine(record.id))
        assert orjson.loads(raw["instance"]) == record.instance
        assert orjson.loads(raw["capacity"]) == {
            "kv_blocks": 2048, "block_size": 16, "max_model_len": 8192, "max_num_seqs": 64,
        }
        decoded = store.decode_record(raw)
        assert decoded is not None
        assert decoded[0] == record and decoded[1] == pytest.approx(0.6)
        assert 0 < await r.pttl(keys.engine(record.id)) <= 600
        assert await r.smembers(keys.index) == {record.id}
        events = await r.xrange(keys.events)
        assert [e[1] for e in events] == [
            {"op": "up", "id": record.id, "instance": record.instance}
        ]
    finally:
        await reg.stop()
        await r.aclose()


async def test_heartbeat_rewrites_and_refreshes_ttl(redis_server: RedisServer) -> None:
    record = make_record(9002)
    reg = RedisRegistrar(redis_server.url, heartbeat_s=0.2, ttl_s=0.6, namespace=NS)
    await reg.start(record)
    r = client(redis_server)
    key = store.Keys(NS).engine(record.id)
    try:
        first = orjson.loads(await r.hget(key, "heartbeat_at"))
        beats = reg.beats
        # Beats until longer than the TTL has passed: only heartbeats keep it alive.
        await wait_for(lambda: reg.beats >= beats + 5, 5)
        assert orjson.loads(await r.hget(key, "heartbeat_at")) > first
        assert await r.pttl(key) > 0
        # A wiped Redis (FLUSHALL ~ restart) gets the whole record back within a beat,
        # with an `up` hint, since the stored instance is gone.
        await r.flushall()

        async def back() -> bool:
            return bool(await r.exists(key))

        await wait_for_async(back, 5)
        assert await r.smembers(store.Keys(NS).index) == {record.id}

        async def announced() -> bool:
            return [e[1]["op"] for e in await r.xrange(store.Keys(NS).events)] == ["up"]

        await wait_for_async(announced, 5)
        # Plain heartbeats do not announce.
        beats = reg.beats
        await wait_for(lambda: reg.beats >= beats + 3, 5)
        assert len(await r.xrange(store.Keys(NS).events)) == 1
    finally:
        await reg.stop()
        await r.aclose()


async def test_stop_deletes_and_announces_down(redis_server: RedisServer) -> None:
    record = make_record(9003)
    reg = RedisRegistrar(redis_server.url, heartbeat_s=0.2, ttl_s=0.6, namespace=NS)
    await reg.start(record)
    await reg.stop()
    r = client(redis_server)
    keys = store.Keys(NS)
    try:
        assert not await r.exists(keys.engine(record.id))
        assert await r.smembers(keys.index) == set()
        ops = [e[1]["op"] for e in await r.xrange(keys.events)]
        assert ops == ["up", "down"]
    finally:
        await r.aclose()


async def test_record_expires_without_heartbeats(redis_server: RedisServer) -> None:
    record = make_record(9004)
    reg = RedisRegistrar(redis_server.url, heartbeat_s=0.2, ttl_s=0.6, namespace=NS)
    await reg.start(record)
    assert reg._task is not None
    reg._task.cancel()  # the engine "dies": no more heartbeats, no clean stop
    r = client(redis_server)
    key = store.Keys(NS).engine(record.id)
    try:
        async def gone() -> bool:
            return not await r.exists(key)

        await wait_for_async(gone, 5)
        # Readers prune the stale index entry.
        assert await store.read_all(r, store.Keys(NS)) == {}
        assert await r.smembers(store.Keys(NS).index) == set()
    finally:
        await r.aclose()
        await reg.backend.close()


async def test_start_raises_when_redis_unreachable() -> None:
    reg = RedisRegistrar(
        f"redis://127.0.0.1:{free_port()}", heartbeat_s=0.2, ttl_s=0.6, namespace=NS
    )
    with pytest.raises(RuntimeError, match="registration"):
        await reg.start(make_record(9005))


async def test_outage_logged_once_and_recovered(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="deepinfer.engine.registration")
    record = make_record(9006)
    reg = RedisRegistrar(redis_server.url, heartbeat_s=0.1, ttl_s=0.3, namespace=NS)
    await reg.start(record)
    try:
        redis_server.kill()
        await wait_for(lambda: reg.failed_beats >= 4, 5)  # several failed heartbeats
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1
        redis_server.start()
        await wait_for(lambda: not reg.failing, 5)
        r = client(redis_server)
        try:
            assert await store.read_all(r, store.Keys(NS)) != {}
        finally:
            await r.aclose()
        assert any("restored" in r.getMessage() for r in caplog.records)
    finally:
        await reg.stop()


async def test_late_stop_does_not_remove_restarted_engine(redis_server: RedisServer) -> None:
    old = make_record(9007)
    new = old.model_copy(update={"instance": "restarted"})
    reg_old = RedisRegistrar(redis_server.url, heartbeat_s=0.2, ttl_s=0.6, namespace=NS)
    reg_new = RedisRegistrar(redis_server.url, heartbeat_s=0.2, ttl_s=0.6, namespace=NS)
    await reg_old.start(old)
    await reg_new.start(new)
    await reg_old.stop()
    r = client(redis_server)
    try:
        found = await store.read_all(r, store.Keys(NS))
        assert found[new.id].record.instance == "restarted"
    finally:
        await reg_new.stop()
        await r.aclose()


async def test_make_registrar_picks_redis(redis_server: RedisServer) -> None:
    reg = make_registrar(redis_server.url, heartbeat_s=0.5, ttl_s=1.5, namespace=NS)
    assert isinstance(reg, RedisRegistrar)
    await reg.start(make_record(9008))
    await reg.stop()
