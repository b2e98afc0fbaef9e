"""The one registration client: keeps one engine record alive in a registry with a
heartbeat, whichever registry it is (a backend: a router's embedded registry over HTTP in
registration.py, a shared Redis in redis_registration.py).

- `Registrar.start(record)` registers now (RegistrationFailed if the registry refuses or
  cannot be reached), then heart-beats on a fixed-rate schedule (a slow write does not
  push later beats back; after an outage it resumes from now, not in a burst), logging an
  outage once and its end once; `stop()` deregisters (the TTL removes the record anyway
  if that fails).
- `BackgroundRegistration` retries the first registration with backoff until the
  registry answers, so an engine that is up does not die because a router or Redis is
  briefly away (`deepinfer-engine launch`); `deepinfer-engine sim` fails fast instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Protocol

from deepinfer_router.shared.engine_record import EngineRecord
from deepinfer_router.shared.tasks import cancel_and_wait

DEFAULT_HEARTBEAT_S = 2.0
DEFAULT_TTL_S = 6.0

log = logging.getLogger("deepinfer.engine.registration")


class RegistrationFailed(RuntimeError):
    """The registry refused the record or could not be reached."""


class RegistryBackend(Protocol):
    """One kind of registry, as the registrar uses it. Every method raises
    RegistrationFailed for a registry that refuses or cannot be reached."""

    where: str  # for messages: "at http://router:8080", "in redis://***@host:6379"

    async def write(self, record: EngineRecord, ttl_s: float, *, first: bool) -> None:
        """Register or refresh `record`, kept for `ttl_s` without another write."""
        ...

    async def delete(self, record: EngineRecord) -> None: ...

    async def close(self) -> None: ...


class Registrar:
    def __init__(
        self,
        backend: RegistryBackend,
        *,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        ttl_s: float = DEFAULT_TTL_S,
    ) -> None:
        if heartbeat_s <= 0 or ttl_s <= heartbeat_s:
            raise ValueError("need 0 < heartbeat_s < ttl_s (about 3 heartbeats per TTL)")
        self.backend = backend
        self._heartbeat_s = heartbeat_s
        self._ttl_s = ttl_s
        self._record: EngineRecord | None = None
        self._task: asyncio.Task[None] | None = None
        self._registered = False
        self.failing = False  # True during an outage (for tests and status lines)
        self.beats = 0  # heartbeats written, and failed (for tests and status lines)
        self.failed_beats = 0

    @property
    def record(self) -> EngineRecord | None:
        return self._record

    async def _write(self, *, first: bool = False) -> None:
        assert self._record is not None
        self._record.heartbeat_at = time.time()
        await self.backend.write(self._record, self._ttl_s, first=first)

    async def start(self, record: EngineRecord) -> None:
        """Register now (raising RegistrationFailed) and keep heart-beating."""
        self._record = record
        if not record.started_at:
            record.started_at = time.time()
        try:
            await self._write(first=True)
        except RegistrationFailed:
            await self.backend.close()
            raise
        self._registered = True
        self._task = asyncio.create_task(self._loop(), name="registrar-heartbeat")

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        where = self.backend.where
        while True:
            next_at += self._heartbeat_s
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            try:
                await self._write()
                self.beats += 1
                if self.failing:
                    log.info("registration %s restored", where)
                self.failing = False
            except Exception as exc:  # never let the heartbeat die
                self.failed_beats += 1
                if not self.failing:  # once per outage, not every heartbeat
                    if isinstance(exc, RegistrationFailed):
                        log.warning("heartbeat %s failed: %s", where, exc)
                    else:
                        log.exception("unexpected error in the heartbeat %s", where)
                self.failing = True
                next_at = loop.time()

    async def stop(self) -> None:
        """Stop heart-beating and deregister."""
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        if self._registered and self._record is not None:
            self._registered = False
            try:
                await self.backend.delete(self._record)
            except RegistrationFailed as exc:  # the TTL removes it anyway
                log.warning("deregistration %s failed: %s", self.backend.where, exc)
        await self.backend.close()


class BackgroundRegistration:
    """Registers in the background, retrying (1 s doubling to 30 s) until the registry
    answers; a fresh registrar per try (`factory`)."""

    def __init__(self, factory: Callable[[], Registrar]) -> None:
        self._factory = factory
        self._task: asyncio.Task[None] | None = None
        self._active: Registrar | None = None
        self.registered = asyncio.Event()

    def start(self, record: EngineRecord) -> None:
        self._task = asyncio.create_task(self._run(record))

    async def _run(self, record: EngineRecord) -> None:
        delay, warned = 1.0, False
        while True:
            registrar = self._factory()
            try:
                await registrar.start(record)
                self._active = registrar
                self.registered.set()
                log.info("registered %s (instance %s)", record.id, record.instance)
                return
            except Exception as exc:  # any registry failure: retry, never crash the engine
                if not warned:
                    log.warning("registration failed (%s); retrying", exc)
                    warned = True
                with contextlib.suppress(Exception):
                    await registrar.stop()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 30.0)

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        if self._active is not None:
            active, self._active = self._active, None
            try:
                await asyncio.wait_for(active.stop(), timeout=10)
                log.info("deregistered")
            except Exception as exc:
                log.warning("deregistration failed: %s", exc)
        self.registered.clear()
