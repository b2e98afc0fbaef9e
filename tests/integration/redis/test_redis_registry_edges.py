"""Router-side RedisRegistry edge cases against a real redis-server: grace after an outage
where Redis did not restart (SIGSTOP), an instance change noticed by the light poll alone,
and two routers deregistering the same engine at once."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import pytest

from deepinfer_engine.redis_registration import RedisRegistrar
from deepinfer_router.shared import redis_store as store
from deepinfer_router.shared.engine_record import new_instance_id
from tests.integration.redis.test_redis_registry import (  # noqa: F401  (fixtures)
    HB,
    NS,
    Factory,
    ids,
    make_registry,
    registrars,
)
from tests.support.redis_server import RedisServer
from tests.support.registry_helpers import ChangeCounter, make_record, wait_for

pytestmark = pytest.mark.timeout(20)

# The outage test's engines: a TTL long enough that one TTL of grace comfortably covers
# the engines' first heartbeat after the gate opens (see below).
OUTAGE_TTL = 1.5
ENGINE_USER, ENGINE_PASS = "engine", "engine-pass"


async def test_paused_redis_outage_keeps_engines_through_grace(
    redis_server: RedisServer,
    make_registry: Factory,  # noqa: F811
    registrars: list[RedisRegistrar],  # noqa: F811
) -> None:
    """Redis hangs (SIGSTOP) for longer than the engines' TTL and comes back with the same
    run_id but their records expired. The router keeps them (grace) until they re-register.

    SIGSTOP alone does not make this ordering certain: a heartbeat in flight on an open
    connection at the pause is executed when Redis continues, and an engine's reconnect can
    land before the router's first read. So the engines log in as their own ACL user, which
    is switched off (and its connections killed) just before the pause and on again only
    after the router's first full read after the outage: their records have really expired
    when the router reads, and the only thing keeping them in its view is the grace."""
    admin = store.connect(redis_server.url)
    observer: asyncio.Task[None] | None = None
    try:
        await admin.execute_command(
            "ACL", "SETUSER", ENGINE_USER, "on", f">{ENGINE_PASS}", "~*", "&*", "+@all"
        )
        engine_url = f"redis://{ENGINE_USER}:{ENGINE_PASS}@127.0.0.1:{redis_server.port}/0"
        keys = store.Keys(NS)
        reg = make_registry(redis_server.url, default_ttl_s=OUTAGE_TTL, socket_timeout_s=0.5)
        await reg.start()
        engines = []
        for port in (9201, 9202):
            eng = RedisRegistrar(engine_url, heartbeat_s=HB, ttl_s=OUTAGE_TTL, namespace=NS)
            await eng.start(make_record(port))
            registrars.append(eng)
            engines.append(eng)
        expected = {e.record.id for e in engines}  # type: ignore[union-attr]
        await wait_for(lambda: reg.status()["up"] and ids(reg) == expected, 3)
        run_id = reg.status()["run_id"]
        assert run_id
        beat_before = {i: r.heartbeat_at for i, r in reg.snapshot().items()}

        # Every observation of the router's view from before the pause to the end.
        observed: list[tuple[frozenset[str], int, bool]] = []
        done = asyncio.Event()

        async def observe() -> None:
            while not done.is_set():
                status = reg.status()
                observed.append((frozenset(reg.snapshot()), status["in_grace"], status["up"]))
                await asyncio.sleep(0.01)

        observer = asyncio.create_task(observe())

        # Gate the engines, kill their connections, hang Redis (nothing awaited between
        # the kill and the pause, so no heartbeat can reconnect in between).
        await admin.execute_command("ACL", "SETUSER", ENGINE_USER, "off")
        await admin.execute_command("CLIENT", "KILL", "USER", ENGINE_USER)
        reads = reg.full_reads
        failed = [e.failed_beats for e in engines]
        redis_server.pause()
        paused_at = time.monotonic()
        try:
            # The router notices the outage; the engines' heartbeats fail; the pause
            # outlasts their TTL, so Redis drops their records as soon as it runs again.
            await wait_for(
                lambda: (
                    reg.status()["up"] is False
                    and all(e.failed_beats >= f + 2 for e, f in zip(engines, failed, strict=True))
                    and time.monotonic() - paused_at > OUTAGE_TTL + 0.3
                ),
                8,
            )
            assert ids(reg) == expected
        finally:
            redis_server.resume()

        # The router's first full read after the outage: records gone, engines kept.
        await wait_for(lambda: reg.status()["up"] and reg.full_reads > reads, 5)
        assert await admin.exists(*(keys.engine(i) for i in expected)) == 0
        assert reg.status()["in_grace"] == len(expected)
        assert ids(reg) == expected

        # Let the engines in: their next heartbeats re-register them, grace ends.
        await admin.execute_command("ACL", "SETUSER", ENGINE_USER, "on")
        await wait_for(
            lambda: reg.status()["in_grace"] == 0 and all(not e.failing for e in engines), 5
        )
        assert await admin.exists(*(keys.engine(i) for i in expected)) == len(expected)
        done.set()
        await observer

        assert observed
        assert all(seen == expected for seen, _, _ in observed), "an engine was dropped"
        assert any(not up for _, _, up in observed)  # the outage was seen...
        assert any(grace == len(expected) for _, grace, _ in observed)  # ...and the grace
        status = reg.status()
        assert status["up"] and status["run_id"] == run_id  # same Redis, not a restart
        snap = reg.snapshot()
        assert set(snap) == expected
        for eng in engines:
            rec = eng.record
            assert rec is not None
            assert snap[rec.id].instance == rec.instance
            # Live again: the view holds a record written after the outage.
            assert snap[rec.id].heartbeat_at > beat_before[rec.id]
    finally:
        redis_server.resume()
        if observer is not None:
            observer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await observer
        # Let the fixture's registrar.stop() deregister (a no-op if already on).
        with contextlib.suppress(Exception):
            await admin.execute_command("ACL", "SETUSER", ENGINE_USER, "on")
        await admin.aclose()


async def test_instance_change_seen_by_the_poll_alone(
    redis_server: RedisServer,
    make_registry: Factory,  # noqa: F811
) -> None:
    """A restarted engine whose `up` hint never reaches the stream: the light poll compares
    instances and re-reads the record, long before any resync."""
    admin = store.connect(redis_server.url)
    keys = store.Keys(NS)
    record = make_record(9210)
    try:
        # Written (and announced) before the router starts: its first full read reads past
        # this hint, so the stream has nothing to tell afterwards.
        await store.write_record(admin, keys, record, 30.0, announce=True)
        changes = ChangeCounter()
        reg = make_registry(
            redis_server.url, on_change=changes, poll_s=0.2, resync_s=60.0, default_ttl_s=30.0
        )
        await reg.start()
        await wait_for(lambda: reg.status()["up"] and ids(reg) == {record.id}, 3)
        assert reg.snapshot()[record.id].instance == record.instance
        reads, polls, calls = reg.full_reads, reg.polls, changes.calls
        events = await admin.xlen(keys.events)

        restarted = record.model_copy(update={"instance": new_instance_id(), "version": "v2"})
        encoded = store.encode_record(restarted, 30.0)
        # Only the hash changes: no XADD, no index or TTL change.
        await admin.hset(
            keys.engine(record.id),
            mapping={"instance": encoded["instance"], "version": encoded["version"]},
        )  # type: ignore[misc]

        await wait_for(lambda: reg.snapshot()[record.id].instance == restarted.instance, 5)
        snap = reg.snapshot()[record.id]
        assert snap.version == "v2"  # the whole record was re-read, not just the instance
        assert reg.full_reads == reads  # no full read...
        assert reg.polls > polls  # ...the poll did it
        assert await admin.xlen(keys.events) == events  # and nothing was on the stream
        assert changes.calls > calls
        assert ids(reg) == {record.id}
    finally:
        await admin.aclose()


async def test_concurrent_deregistration_by_two_routers(
    redis_server: RedisServer,
    make_registry: Factory,  # noqa: F811
) -> None:
    """Both routers' admin APIs deregister the same engine at once. store.delete_record
    deletes the hash and index entry and announces `down` unconditionally, in one MULTI: so
    each call publishes one `down` (two in all; readers treat hints as hints) and exactly
    one of them actually deleted the hash. Each router knew the engine, so each returns True."""
    admin = store.connect(redis_server.url)
    keys = store.Keys(NS)
    record = make_record(9220)
    try:
        # Registered before both routers start: both learn it from their first full read,
        # and no stream read of its `up` hint is still in flight when they deregister.
        await store.write_record(admin, keys, record, 30.0, announce=True)
        c1, c2 = ChangeCounter(), ChangeCounter()
        r1 = make_registry(redis_server.url, on_change=c1, poll_s=0.2, default_ttl_s=30.0)
        r2 = make_registry(redis_server.url, on_change=c2, poll_s=0.2, default_ttl_s=30.0)
        await r1.start()
        await r2.start()
        await wait_for(lambda: ids(r1) == {record.id} and ids(r2) == {record.id}, 3)
        last: Any = await admin.xrevrange(keys.events, count=1)
        after = last[0][0]
        calls = (c1.calls, c2.calls)

        results = await asyncio.gather(r1.deregister(record.id), r2.deregister(record.id))

        assert results == [True, True]
        assert record.id not in ids(r1) and record.id not in ids(r2)
        assert c1.calls > calls[0] and c2.calls > calls[1]
        assert await admin.exists(keys.engine(record.id)) == 0
        assert not await admin.sismember(keys.index, record.id)  # type: ignore[misc]
        new: Any = await admin.xrange(keys.events, min=f"({after}")
        assert [(f["op"], f["id"], f["instance"]) for _, f in new] == [
            ("down", record.id, ""),
            ("down", record.id, ""),
        ]

        # Both routers then read those hints and poll again: the engine stays gone.
        p1, p2 = r1.polls, r2.polls
        await wait_for(lambda: r1.polls >= p1 + 2 and r2.polls >= p2 + 2, 5)
        assert ids(r1) == set() and ids(r2) == set()
        assert r1.status()["up"] and r2.status()["up"]
        assert r1.status()["last_error"] is None and r2.status()["last_error"] is None
    finally:
        await admin.aclose()
