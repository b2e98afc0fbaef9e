"""Active health checks: every engine's `/health`, concurrently, with a timeout. A failed
check takes an engine out of routing; a passing one brings it back. An open circuit
(passive ejection) is not closed by a passing check: after its cool-down one request
goes through as the half-open probe (see Fleet)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import aiohttp

from .fleet import Fleet

log = logging.getLogger("deepinfer.health")


class HealthChecker:
    def __init__(
        self,
        fleet: Fleet,
        session: aiohttp.ClientSession,
        interval_s: float,
        timeout_s: float,
        headers: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fleet = fleet
        self._session = session
        self._interval_s = interval_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._headers = headers
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def check_all(self) -> None:
        states = list(self._fleet.engines.values())
        await asyncio.gather(*(self._check(s.id, s.record.url) for s in states))

    async def _check(self, engine_id: str, url: str) -> None:
        try:
            async with self._session.get(
                f"{url}/health", timeout=self._timeout, headers=self._headers
            ) as resp:
                ok = resp.status == 200
        except (TimeoutError, aiohttp.ClientError, ValueError):
            ok = False
        state = self._fleet.engines.get(engine_id)
        if state is not None and state.healthy != ok:
            log.warning("engine %s (%s) is %s", engine_id, url, "healthy" if ok else "unhealthy")
        self._fleet.health_result(engine_id, ok, self._clock())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.check_all()
            except Exception:  # never let one odd failure end the checks for good
                log.exception("health checks failed")
