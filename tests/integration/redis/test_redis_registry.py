"""Router-side discovery from a real redis-server: full reads, change notices, expiry,
restarts with grace, outages, namespaces and AUTH."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

import pytest

from deepinfer_engine.redis_registration import RedisRegistrar
from deepinfer_router.registry.base import RegistryUnavailableError
from deepinfer_router.registry.redis import RedisRegistry
from tests.support.redis_server import RedisServer
from tests.support.registry_helpers import ChangeCounter, make_record, wait_for

pytestmark = pytest.mark.timeout(20)

NS = "fleet-a"
HB = 0.2
TTL = 0.6

Factory = Callable[..., RedisRegistry]


@pytest.fixture
async def make_registry() -> AsyncIterator[Factory]:
    made: list[RedisRegistry] = []

    def factory(url: str, namespace: str = NS, **kw: object) -> RedisRegistry:
        kw.setdefault("default_ttl_s", TTL)
        reg = RedisRegistry(url, namespace, kw.pop("on_change", ChangeCounter()), **kw)  # type: ignore[arg-type]
        made.append(reg)
        return reg

    yield factory
    for reg in made:
        await reg.close()


@pytest.fixture
async def registrars() -> AsyncIterator[list[RedisRegistrar]]:
    made: list[RedisRegistrar] = []
    yield made
    for reg in made:
        if reg._task is not None and not reg._task.done():
            await reg.stop()


async def start_engine(
    url: str, port: int, made: list[RedisRegistrar], namespace: str = NS
) -> RedisRegistrar:
    reg = RedisRegistrar(url, heartbeat_s=HB, ttl_s=TTL, namespace=namespace)
    await reg.start(make_record(port))
    made.append(reg)
    return reg


def crash(reg: RedisRegistrar) -> None:
    """Like SIGKILL of the engine: heartbeats stop, nothing is deregistered."""
    assert reg._task is not None
    reg._task.cancel()


def ids(reg: RedisRegistry) -> set[str]:
    return set(reg.snapshot())


async def test_full_read_at_start_and_on_change(
    redis_server: RedisServer, make_registry: Factory, registrars: list[RedisRegistrar]
) -> None:
    a = await start_engine(redis_server.url, 9101, registrars)
    b = await start_engine(redis_server.url, 9102, registrars)
    changes = ChangeCounter()
    reg = make_registry(redis_server.url, on_change=changes)
    await reg.start()
    await wait_for(lambda: reg.status()["up"], 3)
    assert ids(reg) == {a.record.id, b.record.id}  # type: ignore[union-attr]
    assert changes.calls >= 1
    snap = reg.snapshot()[a.record.id]  # type: ignore[union-attr]
    assert snap.capacity.kv_blocks == 2048 and snap.instance == a.record.instance  # type: ignore[union-attr]
    status = reg.status()
    assert status["backend"] == "redis" and status["engines"] == 2
    assert status["last_error"] is None and status["run_id"]


async def test_change_notices_are_fast(
    redis_server: RedisServer, make_registry: Factory, registrars: list[RedisRegistrar]
) -> None:
    # Polls and resyncs far apart: only the stream can explain quick updates.
    reg = make_registry(redis_server.url, poll_s=30.0, resync_s=60.0, default_ttl_s=30.0)
    await reg.start()
    await wait_for(lambda: reg.status()["up"], 3)
    reads, polls = reg.full_reads, reg.polls
    eng = await start_engine(redis_server.url, 9103, registrars)
    await wait_for(lambda: eng.record.id in ids(reg), 5)  # type: ignore[union-attr]
    # Restart with a new instance: the new record replaces the old one.
    await eng.stop()
    await wait_for(lambda: not ids(reg), 5)
    # Neither a full read nor a poll ran: the change stream alone told the registry.
    assert (reg.full_reads, reg.polls) == (reads, polls)
    restarted = make_record(9103)
    eng2 = RedisRegistrar(redis_server.url, heartbeat_s=HB, ttl_s=TTL, namespace=NS)
    await eng2.start(restarted)
    registrars.append(eng2)
    await wait_for(
        lambda: reg.snapshot().get(restarted.id) is not None
        and reg.snapshot()[restarted.id].instance == restarted.instance,
        1,
    )


async def test_crashed_engine_leaves_within_its_ttl(
    redis_server: RedisServer, make_registry: Factory, registrars: list[RedisRegistrar]
) -> None:
    reg = make_registry(redis_server.url, poll_s=5.0)
    await reg.start()
    a = await start_engine(redis_server.url, 9104, registrars)
    b = await start_engine(redis_server.url, 9105, registrars)
    await wait_for(lambda: len(ids(reg)) == 2, 2)
    reads = reg.full_reads
    crash(a)
    await wait_for(lambda: a.record.id not in ids(reg), 5)  # type: ignore[union-attr]
    # Removed at its expiry by the light poll (poll_s 5 s, far beyond the TTL), not by a
    # full resync.
    assert reg.full_reads == reads and reg.polls >= 1
    assert ids(reg) == {b.record.id}  # type: ignore[union-attr]
    # The survivor is not removed while it heart-beats (several TTLs of beats).
    beats = b.beats
    await wait_for(lambda: b.beats >= beats + 10, 10)
    assert ids(reg) == {b.record.id}  # type: ignore[union-attr]


async def test_redis_down_at_router_start(make_registry: Factory) -> None:
    server = RedisServer(start=False)
    try:
        reg = make_registry(server.url)
        await reg.start()
        # start() returned before the first read was even tried: it never blocks on Redis.
        assert reg.status()["last_error"] is None and reg.status()["up"] is False
        await wait_for(lambda: reg.status()["last_error"] is not None, 3)
        assert reg.status()["up"] is False and reg.snapshot() == {}
        server.start()
        eng = RedisRegistrar(server.url, heartbeat_s=HB, ttl_s=TTL, namespace=NS)
        await eng.start(make_record(9106))
        try:
            await wait_for(lambda: reg.status()["up"], 8)
            await wait_for(lambda: ids(reg) == {eng.record.id}, 2)  # type: ignore[union-attr]
            assert reg.status()["last_error"] is None
        finally:
            await eng.stop()
    finally:
        server.close()


async def test_redis_killed_and_restarted(
    redis_server: RedisServer, make_registry: Factory, registrars: list[RedisRegistrar]
) -> None:
    changes = ChangeCounter()
    reg = make_registry(redis_server.url, on_change=changes)
    await reg.start()
    engines = [await start_engine(redis_server.url, 9110 + i, registrars) for i in range(3)]
    expected = {e.record.id for e in engines}  # type: ignore[union-attr]
    await wait_for(lambda: ids(reg) == expected, 2)
    run_id = reg.status()["run_id"]

    redis_server.kill()
    await wait_for(lambda: reg.status()["up"] is False, 5)
    # Well past the TTL (the engines' heartbeats fail meanwhile): still the last view.
    failed = engines[0].failed_beats
    await wait_for(lambda: engines[0].failed_beats >= failed + 10, 10)
    assert ids(reg) == expected
    assert reg.status()["last_error"]

    redis_server.start()
    await wait_for(lambda: reg.status()["up"], 8)
    # Engines are back in the new Redis within 2 heartbeats (one beat + backoff slack)...
    await wait_for(lambda: all(not e.failing for e in engines), 2 * HB + 0.2)
    # ...and the registry holds them as live records, not under grace.
    await wait_for(lambda: reg.status()["in_grace"] == 0, 2 * HB + 1.0)
    assert ids(reg) == expected
    assert reg.status()["run_id"] != run_id


async def test_run_id_change_grace_then_removal(
    redis_server: RedisServer, make_registry: Factory, registrars: list[RedisRegistrar]
) -> None:
    reg = make_registry(redis_server.url, default_ttl_s=1.0)
    await reg.start()
    live = await start_engine(redis_server.url, 9120, registrars)
    # Registered once through the admin API, never heart-beaten after the restart.
    orphan = make_record(9121)
    await wait_for(lambda: reg.status()["up"], 3)
    await reg.register(orphan, ttl_s=5.0)
    await wait_for(lambda: ids(reg) == {live.record.id, orphan.id}, 2)  # type: ignore[union-attr]

    redis_server.restart()  # new run_id, empty store
    restarted_at = time.time()
    await wait_for(lambda: reg.status()["up"] and reg.status()["in_grace"] == 1, 8)
    # The orphan is kept for one TTL (its own, 5 s) after the restart was seen...
    assert orphan.id in ids(reg)
    beats = live.beats  # several of the live engine's beats later, both are still there
    await wait_for(lambda: live.beats >= beats + 2, 5)
    assert ids(reg) == {live.record.id, orphan.id}  # type: ignore[union-attr]
    # ...then removed.
    await wait_for(lambda: orphan.id not in ids(reg), 8)
    assert time.time() - restarted_at >= 5.0 - 0.2
    assert ids(reg) == {live.record.id}  # type: ignore[union-attr]


async def test_periodic_resync_catches_missed_notices(
    redis_server: RedisServer, make_registry: Factory
) -> None:
    reg = make_registry(redis_server.url, poll_s=30.0, resync_s=0.5, default_ttl_s=30.0)
    await reg.start()
    await wait_for(lambda: reg.status()["up"], 3)
    # Written without any stream entry (e.g. the hint was trimmed or lost).
    from deepinfer_router.shared import redis_store as store

    r = store.connect(redis_server.url)
    try:
        record = make_record(9130)
        keys = store.Keys(NS)
        await r.hset(keys.engine(record.id), mapping=store.encode_record(record, 30.0))  # type: ignore[arg-type]
        await r.expire(keys.engine(record.id), 30)
        await r.sadd(keys.index, record.id)  # type: ignore[misc]
        reads = reg.full_reads
        await wait_for(lambda: record.id in ids(reg), 2)
        assert reg.full_reads > reads
    finally:
        await r.aclose()


async def test_namespace_isolation(
    redis_server: RedisServer, make_registry: Factory, registrars: list[RedisRegistrar]
) -> None:
    a = make_registry(redis_server.url, namespace="fleet-a")
    b = make_registry(redis_server.url, namespace="fleet-b")
    await a.start()
    await b.start()
    ea = await start_engine(redis_server.url, 9140, registrars, namespace="fleet-a")
    eb = await start_engine(redis_server.url, 9141, registrars, namespace="fleet-b")
    await wait_for(lambda: ids(a) == {ea.record.id} and ids(b) == {eb.record.id}, 2)  # type: ignore[union-attr]
    beats = ea.beats + eb.beats  # more writes from both: still each in its own namespace
    await wait_for(lambda: ea.beats + eb.beats >= beats + 4, 5)
    assert ids(a) == {ea.record.id} and ids(b) == {eb.record.id}  # type: ignore[union-attr]


async def test_auth_through_url(
    auth_redis_server: RedisServer, make_registry: Factory, registrars: list[RedisRegistrar]
) -> None:
    url = auth_redis_server.url
    assert ":s3cret-pass@" in url
    reg = make_registry(url)
    await reg.start()
    eng = await start_engine(url, 9150, registrars)
    await wait_for(lambda: ids(reg) == {eng.record.id}, 3)  # type: ignore[union-attr]

    bad_url = url.replace("s3cret-pass", "wrong")
    bad = make_registry(bad_url)
    await bad.start()
    await wait_for(lambda: bad.status()["last_error"] is not None, 3)
    assert bad.status()["up"] is False
    assert "s3cret" not in str(bad.status())  # no password in the status detail
    with pytest.raises(RuntimeError):
        await RedisRegistrar(bad_url, heartbeat_s=HB, ttl_s=TTL, namespace=NS).start(
            make_record(9151)
        )


async def test_admin_register_and_deregister_shared(
    redis_server: RedisServer, make_registry: Factory
) -> None:
    """The admin API of one router writes to Redis; the other router sees it."""
    r1 = make_registry(redis_server.url, default_ttl_s=2.0)
    r2 = make_registry(redis_server.url, default_ttl_s=2.0)
    await r1.start()
    await r2.start()
    await wait_for(lambda: r1.status()["up"] and r2.status()["up"], 3)
    record = make_record(9160)
    await r1.register(record)  # default TTL
    assert record.id in ids(r1)  # visible locally at once
    await wait_for(lambda: record.id in ids(r2), 0.5)
    assert await r2.deregister(record.id) is True
    assert record.id not in ids(r2)
    await wait_for(lambda: record.id not in ids(r1), 0.5)
    assert await r2.deregister(record.id) is False


async def test_admin_write_while_redis_down_raises(
    redis_server: RedisServer, make_registry: Factory
) -> None:
    reg = make_registry(redis_server.url)
    await reg.start()
    await wait_for(lambda: reg.status()["up"], 3)
    redis_server.kill()
    with pytest.raises(RegistryUnavailableError):
        await reg.register(make_record(9170))
    with pytest.raises(RegistryUnavailableError):
        await reg.deregister("e-nothing")


async def test_two_routers_agree_within_one_heartbeat(
    redis_server: RedisServer, make_registry: Factory, registrars: list[RedisRegistrar]
) -> None:
    r1 = make_registry(redis_server.url)
    r2 = make_registry(redis_server.url)
    await r1.start()
    await r2.start()
    await wait_for(lambda: r1.status()["up"] and r2.status()["up"], 3)
    engines = [await start_engine(redis_server.url, 9180 + i, registrars) for i in range(3)]
    await wait_for(lambda: len(ids(r1)) == 3, 2)
    await wait_for(lambda: ids(r2) == ids(r1), HB)
    crash(engines[0])
    await wait_for(lambda: len(ids(r1)) == 2, 2)
    await wait_for(lambda: ids(r2) == ids(r1), HB)


async def test_on_change_errors_do_not_stop_the_registry(
    redis_server: RedisServer, make_registry: Factory, registrars: list[RedisRegistrar]
) -> None:
    def boom() -> None:
        raise ValueError("bad callback")

    reg = make_registry(redis_server.url, on_change=boom)
    await reg.start()
    a = await start_engine(redis_server.url, 9190, registrars)
    await wait_for(lambda: a.record.id in ids(reg), 2)  # type: ignore[union-attr]
    b = await start_engine(redis_server.url, 9191, registrars)
    await wait_for(lambda: b.record.id in ids(reg), 2)  # type: ignore[union-attr]
    assert reg.status()["up"]


async def test_close_is_prompt_while_reading(
    redis_server: RedisServer, registrars: list[RedisRegistrar]
) -> None:
    """close() must not wait out a blocked XREAD (nor lose its cancellation)."""
    await start_engine(redis_server.url, 9195, registrars)
    for _ in range(5):
        reg = RedisRegistry(redis_server.url, NS, ChangeCounter(), default_ttl_s=TTL)
        await reg.start()
        await wait_for(lambda: reg.status()["up"] and len(ids(reg)) == 1, 3)  # noqa: B023
        for _ in range(3):
            await asyncio.sleep(0)
        # The stream read blocks 5 s at a time: close() must end well before one block.
        await asyncio.wait_for(reg.close(), 2.5)
