"""Engine-side registration into a shared Redis: the whole record rewritten as a hash with
a TTL on every heartbeat (so a restarted Redis has it back within one heartbeat), an index
entry, and an `up` hint on the change stream. A clean stop deletes it and says `down`.
Key layout: deepinfer_router/registry/redis_store.py."""

from __future__ import annotations

import asyncio
import logging
import time

from redis.exceptions import RedisError

from deepinfer_router.shared import redis_store as store
from deepinfer_router.shared.engine_record import EngineRecord
from deepinfer_router.shared.tasks import cancel_and_wait

from .registrar import DEFAULT_HEARTBEAT_S, DEFAULT_TTL_S

log = logging.getLogger("deepinfer.engine.registration")


def _redact(url: str) -> str:
    """The URL without its password, for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"


class RedisRegistrar:
    """Keeps one engine record alive in Redis; matches engines.registration.Registrar."""

    def __init__(
        self,
        url: str,
        *,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        ttl_s: float = DEFAULT_TTL_S,
        namespace: str = "deepinfer",
    ) -> None:
        if heartbeat_s <= 0 or ttl_s <= heartbeat_s:
            raise ValueError("need 0 < heartbeat_s < ttl_s (about 3 heartbeats per TTL)")
        self._url = url
        self._heartbeat_s = heartbeat_s
        self._ttl_s = ttl_s
        self._keys = store.Keys(namespace)
        # A write must finish well within a heartbeat, or the loop falls behind the TTL.
        self._redis = store.connect(url, socket_timeout=min(2.0, heartbeat_s))
        self._record: EngineRecord | None = None
        self._task: asyncio.Task[None] | None = None
        self.failing = False  # True during an outage (for tests and status lines)
        self.beats = 0  # heartbeats written, and failed (for tests and status lines)
        self.failed_beats = 0

    @property
    def record(self) -> EngineRecord | None:
        return self._record

    async def _write(self, *, announce: bool = False) -> None:
        assert self._record is not None
        self._record.heartbeat_at = time.time()
        await store.write_record(
            self._redis, self._keys, self._record, self._ttl_s, announce=announce
        )

    async def start(self, record: EngineRecord) -> None:
        self._record = record
        if not record.started_at:
            record.started_at = time.time()
        try:
            await self._write(announce=True)
        except (RedisError, OSError) as exc:
            await self._redis.aclose()
            raise RuntimeError(f"registration in {_redact(self._url)} failed: {exc}") from exc
        self._task = asyncio.create_task(self._loop(), name="redis-registrar")

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            # Fixed-rate schedule: a slow write does not push later heartbeats back.
            next_at += self._heartbeat_s
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            try:
                await self._write()
                self.beats += 1
                if self.failing:
                    log.info("registration in %s restored", _redact(self._url))
                self.failing = False
            except (RedisError, OSError) as exc:
                self.failed_beats += 1
                if not self.failing:  # once per outage, not every heartbeat
                    log.warning("heartbeat to %s failed: %s", _redact(self._url), exc)
                self.failing = True
                next_at = loop.time()  # after an outage, resume from now, not a burst
            except Exception:  # never let the heartbeat die silently
                log.exception("unexpected error in the Redis heartbeat")
                self.failing = True
                next_at = loop.time()

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        if self._record is not None:
            try:
                await store.delete_record(
                    self._redis, self._keys, self._record.id, instance=self._record.instance
                )
            except (RedisError, OSError) as exc:
                # The TTL removes it anyway.
                log.warning("deregistration in %s failed: %s", _redact(self._url), exc)
        await self._redis.aclose()
