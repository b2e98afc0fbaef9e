"""Sharing what routers learn, through Redis, so that several routers route alike.

Each router's kv-aware policy keeps the placements it makes (chunk-hash chains, session
bindings) in an in-memory outbox (`export_hints`). A background task here drains it every
`interval_s` (~100 ms), publishes one batch per tick on the stream `{ns}:hints`, and
applies other routers' batches to the local policy (`import_hints`). The request path
never waits on Redis: it only appends to the outbox.

A router that starts (or reconnects) first replays the stream's recent history (MAXLEN ~
`maxlen` batches) so it is warm at once; hints for another instance of an engine or
another chunk size are ignored by the policy. Redis being down only means hints are
dropped for a while: each router keeps routing on its own knowledge.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import orjson
from redis.exceptions import RedisError

from .routing.base import EngineLookup
from .shared import redis_store as store
from .shared.tasks import cancel_and_wait

log = logging.getLogger("deepinfer.registry.hints")

_BACKOFF_MAX_S = 5.0


# A stream entry larger than this is not parsed: a batch of `batch_max` hints of real
# prompts is far smaller, and anyone who can write to Redis can write one.
MAX_BATCH_BYTES = 8 << 20


class HintPolicy(Protocol):
    """The sharing hooks of a routing policy (routing.base.PolicyBase has no-op ones)."""

    def export_hints(self, limit: int = 0) -> list[dict[str, Any]]: ...

    def import_hints(
        self, hints: Iterable[Mapping[str, Any]], now: float, lookup: EngineLookup
    ) -> int: ...


class RedisHints:
    """Publishes this router's placements and imports the others' (see module doc)."""

    def __init__(
        self,
        url: str,
        namespace: str,
        policy: HintPolicy,
        engines: EngineLookup,
        *,
        interval_s: float = 0.1,
        batch_max: int = 1024,
        maxlen: int = 2000,
        now: Callable[[], float] = time.monotonic,  # the clock the proxy passes to policies
        router_id: str | None = None,
    ) -> None:
        self._policy = policy
        self._engines = engines  # hints about engines the fleet lacks are ignored
        self._key = f"{namespace}:hints"
        self._interval_s = interval_s
        self._batch_max = batch_max
        self._maxlen = maxlen
        self._now = now
        self.router_id = router_id or uuid.uuid4().hex[:12]
        self._redis = store.connect(url, socket_timeout=interval_s + 2.0)
        self._task: asyncio.Task[None] | None = None
        self._up = False
        self._logged_down = False
        self._last_error: str | None = None
        self.published = 0  # hints, for status and tests
        self.imported = 0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="redis-hints")

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        try:
            await self._redis.aclose()
        except Exception as exc:  # closing a broken client must not fail shutdown
            log.debug("closing the hints client: %s", exc)

    def status(self) -> dict[str, Any]:
        return {
            "backend": "redis-hints",
            "up": self._up,
            "published": self.published,
            "imported": self.imported,
            "last_error": self._last_error,
        }

    async def _run(self) -> None:
        backoff = 0.1
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if not isinstance(exc, RedisError | OSError):
                    log.exception("unexpected error in the hints loop")
                self._last_error = f"{type(exc).__name__}: {exc}"
                if not self._logged_down:
                    log.warning("hint sharing through Redis paused: %s", self._last_error)
                    self._logged_down = True
                self._up = False
                await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
                backoff = min(backoff * 2, _BACKOFF_MAX_S)

    async def _session(self) -> None:
        last_id = "0-0"  # replay the recent history first: a new router starts warm
        first = True
        while True:
            await self._publish()
            resp: Any = await self._redis.xread(
                {self._key: last_id},
                count=256,
                block=None if first else max(1, int(self._interval_s * 1000)),
            )
            if first or not self._up:
                self._up = True
                self._last_error = None
                if self._logged_down:
                    log.info("hint sharing through Redis resumed")
                    self._logged_down = False
            first = False
            for _stream, entries in resp or ():
                for entry_id, fields in entries:
                    last_id = entry_id
                    if fields.get("r") == self.router_id:
                        continue
                    self._apply(fields.get("h", "[]"))

    async def _publish(self) -> None:
        hints = self._policy.export_hints(self._batch_max)
        if not hints:
            return
        # Lost if Redis is down: they are hints, and the next placements are published.
        await self._redis.xadd(
            self._key,
            {"r": self.router_id, "h": orjson.dumps(hints).decode()},
            maxlen=self._maxlen,
            approximate=True,
        )
        self.published += len(hints)

    def _apply(self, payload: str) -> None:
        if len(payload) > MAX_BATCH_BYTES:
            return
        try:
            hints = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return
        if isinstance(hints, list):
            self.imported += self._policy.import_hints(
                (h for h in hints if isinstance(h, dict)), self._now(), self._engines
            )
