"""The shared Redis registry, router side.

The hot path never touches Redis: routers read `snapshot()` from memory. A background
task keeps that view fresh:

- full read (index + every hash) at start, on every reconnect, when Redis's `run_id`
  changes, and every `resync_s`;
- XREAD BLOCK on the change stream in between, so new, restarted and stopped engines
  show up within a round trip;
- a light poll (PTTL + instance of each known engine, the index, `run_id`), run when the
  earliest known record is due to expire and at least every `poll_s`: a record whose hash
  is gone leaves at its expiry, not at the next resync.

Redis going away never removes engines: the last known view stays, `up` turns False, the
loop retries with jittered backoff. After a Redis restart (new `run_id`) or an outage,
engines missing from the first read are kept for one TTL of grace, so that they can
re-register with their next heartbeat.

One file over 300 lines on purpose: the full read, the stream, the poll and the grace
period are one state machine over one view; the wire format is shared/redis_store.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

from ..shared import redis_store as store
from ..shared.engine_record import EngineRecord
from ..shared.redis_store import StoredRecord
from ..shared.registry_url import redact
from ..shared.tasks import cancel_and_wait
from .base import RegistryUnavailableError

log = logging.getLogger("deepinfer.registry.redis")

_STREAM_BLOCK_S = 5.0
_MIN_POLL_GAP_S = 0.05
_BACKOFF_FIRST_S = 0.1
_BACKOFF_MAX_S = 5.0


@dataclass(slots=True)
class _Entry:
    record: EngineRecord
    ttl_s: float
    expires_at: float  # when Redis will drop the hash unless heart-beaten (now() clock)
    grace_until: float | None = None  # set while missing after a restart/outage


def _same(a: EngineRecord, b: EngineRecord) -> bool:
    """Equal apart from the heartbeat time (which changes on every beat)."""
    return a.model_dump(exclude={"heartbeat_at"}) == b.model_dump(exclude={"heartbeat_at"})


class _Resync(Exception):
    """Internal: the poll wants a full read (run_id changed or resync due)."""


class RedisRegistry:
    """WritableRegistry backed by a shared Redis (see module docstring)."""

    name = "redis"

    def __init__(
        self,
        url: str,
        namespace: str,
        on_change: Callable[[], None],
        *,
        default_ttl_s: float,
        resync_s: float = 30.0,
        now: Callable[[], float] = time.time,
        poll_s: float | None = None,
        socket_timeout_s: float = 2.0,
    ) -> None:
        self._url = url
        self._keys = store.Keys(namespace)
        self._on_change = on_change
        self._default_ttl_s = default_ttl_s
        self._resync_s = resync_s
        self._now = now
        self._poll_s = poll_s if poll_s is not None else min(5.0, max(0.5, default_ttl_s / 3))
        self._redis = store.connect(url, socket_timeout=socket_timeout_s)
        # Blocking XREAD holds its connection; its own client gets a timeout beyond BLOCK.
        self._stream_redis = store.connect(url, socket_timeout=_STREAM_BLOCK_S + 3.0)
        self._entries: dict[str, _Entry] = {}
        self._snapshot: dict[str, EngineRecord] = {}
        self._dirty = False
        self._up = False
        self._ever_up = False
        self._outage = False  # lost Redis after having it: the next full read grants grace
        self._logged_down = False
        self._last_error: str | None = None
        self._run_id: str | None = None
        self._stream_from = "$"
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._children: list[asyncio.Task[None]] = []
        self.full_reads = 0  # counters for status and tests
        self.polls = 0

    # ---- RegistrySource -----------------------------------------------------------

    async def start(self) -> None:
        """Returns at once; the first read happens in the background (Redis may be down)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="redis-registry")

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        for child in self._children:  # if close() interrupted _watch's own clean-up
            await cancel_and_wait(child)
        for client in (self._redis, self._stream_redis):
            with contextlib.suppress(Exception):
                await client.aclose()

    def snapshot(self) -> dict[str, EngineRecord]:
        return dict(self._snapshot)

    def status(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "up": self._up,
            "engines": len(self._snapshot),
            "in_grace": sum(1 for e in self._entries.values() if e.grace_until is not None),
            "last_error": self._last_error,
            "run_id": self._run_id,
            "namespace": self._keys.namespace,
        }

    # ---- WritableRegistry (the admin API in redis mode) --------------------------------

    async def register(self, record: EngineRecord, ttl_s: float | None = None) -> None:
        ttl = ttl_s if ttl_s and ttl_s > 0 else self._default_ttl_s
        try:
            await store.write_record(self._redis, self._keys, record, ttl)
        except (RedisError, OSError) as exc:
            raise RegistryUnavailableError(f"Redis registry unavailable: {exc}") from exc
        self._upsert(record, ttl, self._now() + ttl)
        self._flush()

    async def deregister(self, engine_id: str) -> bool:
        try:
            deleted = await store.delete_record(self._redis, self._keys, engine_id)
        except (RedisError, OSError) as exc:
            raise RegistryUnavailableError(f"Redis registry unavailable: {exc}") from exc
        known = self._remove(engine_id)
        self._flush()
        return deleted or known

    # ---- local view ----------------------------------------------------------------

    def _upsert(self, record: EngineRecord, ttl_s: float, expires_at: float) -> None:
        entry = self._entries.get(record.id)
        if entry is not None and _same(entry.record, record):
            entry.record = record
            entry.ttl_s = ttl_s
            entry.expires_at = expires_at
            entry.grace_until = None
            self._snapshot[record.id] = record
            return
        self._entries[record.id] = _Entry(record, ttl_s, expires_at)
        self._snapshot[record.id] = record
        self._dirty = True

    def _upsert_stored(self, stored: StoredRecord, now: float) -> None:
        ttl = stored.ttl_s if stored.ttl_s > 0 else self._default_ttl_s
        expires = now + stored.pttl_ms / 1000 if stored.pttl_ms >= 0 else math.inf
        self._upsert(stored.record, ttl, expires)

    def _remove(self, engine_id: str) -> bool:
        if self._entries.pop(engine_id, None) is None:
            return False
        self._snapshot.pop(engine_id, None)
        self._dirty = True
        return True

    def _missing(self, engine_id: str, now: float, *, grant_grace: bool = False) -> None:
        """The hash of a known engine is gone: remove it unless it is (or gets) grace."""
        entry = self._entries.get(engine_id)
        if entry is None:
            return
        if grant_grace and entry.grace_until is None:
            entry.grace_until = now + entry.ttl_s
        if entry.grace_until is not None and now < entry.grace_until:
            return
        log.info("engine %s left the Redis registry (record expired or removed)", engine_id)
        self._remove(engine_id)

    def _flush(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        try:
            self._on_change()
        except Exception:  # a bad callback must not stop the registry
            log.exception("registry on_change callback failed")

    def _mark_up(self) -> None:
        if not self._up and self._logged_down:
            log.info("Redis registry %s reachable again", redact(self._url))
        self._up = True
        self._ever_up = True
        self._logged_down = False
        self._last_error = None

    def _mark_down(self, exc: BaseException) -> None:
        self._last_error = f"{type(exc).__name__}: {exc}"
        if self._ever_up:
            self._outage = True
        if not self._logged_down:  # once per outage
            log.warning(
                "Redis registry %s unreachable (%s); routing on the last %d known engines",
                redact(self._url),
                self._last_error,
                len(self._snapshot),
            )
            self._logged_down = True
        self._up = False

    # ---- background loop -------------------------------------------------------------

    async def _run(self) -> None:
        backoff = _BACKOFF_FIRST_S
        while not self._closing:
            try:
                await self._full_read()
                self._mark_up()
                backoff = _BACKOFF_FIRST_S
                await self._watch()  # returns when a full read is due
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not isinstance(exc, RedisError | OSError):
                    log.exception("unexpected error in the Redis registry loop")
                self._mark_down(exc)
                self._flush()
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, _BACKOFF_MAX_S)

    async def _full_read(self) -> None:
        r = self._redis
        run_id = await store.server_run_id(r)
        stream_from = await store.last_event_id(r, self._keys)  # before the read: no gap
        found = await store.read_all(r, self._keys)
        now = self._now()
        restarted = self._run_id is not None and run_id != self._run_id
        grant_grace = restarted or self._outage
        if restarted:
            log.warning(
                "Redis restarted (run_id %s -> %s): %d engines read, missing ones kept "
                "for one TTL to re-register",
                self._run_id,
                run_id,
                len(found),
            )
        for stored in found.values():
            self._upsert_stored(stored, now)
        for engine_id in [i for i in self._entries if i not in found]:
            self._missing(engine_id, now, grant_grace=grant_grace)
        self._run_id = run_id
        self._stream_from = stream_from
        self._outage = False
        self.full_reads += 1
        self._flush()

    async def _watch(self) -> None:
        tasks = self._children = [
            asyncio.create_task(self._stream_loop(), name="redis-registry-stream"),
            asyncio.create_task(self._poll_loop(), name="redis-registry-poll"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                await cancel_and_wait(task)
        for task in done:
            exc = task.exception()
            if isinstance(exc, _Resync):
                return
            if exc is not None:
                raise exc

    async def _stream_loop(self) -> None:
        while not self._closing:
            resp: Any = await self._stream_redis.xread(
                {self._keys.events: self._stream_from},
                count=256,
                block=int(_STREAM_BLOCK_S * 1000),
            )
            if not resp:
                continue
            changed: dict[str, str] = {}  # id -> last op
            for _stream, entries in resp:
                for entry_id, fields in entries:
                    self._stream_from = entry_id
                    engine_id = fields.get("id")
                    if engine_id:
                        changed[engine_id] = fields.get("op", "up")
            found = await store.read_records(self._redis, self._keys, list(changed))
            now = self._now()
            for engine_id, stored in found.items():
                if stored is not None:
                    self._upsert_stored(stored, now)
                elif changed[engine_id] == "down":
                    self._remove(engine_id)  # a clean stop: no grace
                else:
                    self._missing(engine_id, now)
            self._flush()

    async def _poll_loop(self) -> None:
        loop = asyncio.get_running_loop()
        resync_at = loop.time() + self._resync_s
        next_poll = loop.time() + self._poll_s
        while not self._closing:
            now = self._now()
            due = [e.expires_at for e in self._entries.values() if e.grace_until is None]
            due += [e.grace_until for e in self._entries.values() if e.grace_until is not None]
            # Wake just after the earliest expiry, when Redis has dropped the hash.
            wait = min(
                [next_poll - loop.time(), resync_at - loop.time(), *(d - now + 0.005 for d in due)]
            )
            await asyncio.sleep(max(_MIN_POLL_GAP_S, wait))
            if loop.time() >= resync_at:
                raise _Resync
            await self._poll()
            next_poll = loop.time() + self._poll_s

    async def _poll(self) -> None:
        r = self._redis
        ids = list(self._entries)
        async with r.pipeline(transaction=False) as pipe:
            pipe.info("server")
            pipe.smembers(self._keys.index)
            for engine_id in ids:
                key = self._keys.engine(engine_id)
                pipe.pttl(key)
                pipe.hget(key, "instance")
            res = await pipe.execute()
        self.polls += 1
        if str(res[0].get("run_id", "")) != self._run_id:
            raise _Resync
        indexed: set[str] = set(res[1])
        now = self._now()
        refetch = [i for i in indexed if i not in self._entries]
        for n, engine_id in enumerate(ids):
            pttl, instance = int(res[2 + 2 * n]), res[3 + 2 * n]
            entry = self._entries.get(engine_id)
            if entry is None:
                continue
            if pttl == -2 or instance is None:
                self._missing(engine_id, now)
            elif store.encode_instance(entry.record.instance) != instance:
                refetch.append(engine_id)  # restarted engine: read the new record
            elif entry.grace_until is not None:
                refetch.append(engine_id)  # back after a restart: refresh it fully
            else:
                entry.expires_at = now + pttl / 1000 if pttl >= 0 else math.inf
        if refetch:
            for stored in (await store.read_records(r, self._keys, refetch)).values():
                if stored is not None:
                    self._upsert_stored(stored, now)
        self._flush()
