"""A background loop that runs one round of work every interval, for the router's
observers (scraper, health checks) and the embedded registry's expiry sweep."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp

from .fleet import Fleet
from .shared.tasks import cancel_and_wait

log = logging.getLogger("deepinfer.periodic")


class Periodic:
    """Calls `run_once()` every `interval_s` (measured start to start) until closed.
    An unexpected error is logged and the loop goes on: one odd failure must not end
    health checks or scrapes for good."""

    def __init__(self, interval_s: float, name: str) -> None:
        self.interval_s = interval_s
        self._name = name
        self._task: asyncio.Task[None] | None = None

    async def run_once(self) -> None:
        raise NotImplementedError

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name=self._name)

    async def close(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)

    async def _loop(self) -> None:
        while True:
            started = time.monotonic()
            try:
                await self.run_once()
            except Exception:
                log.exception("%s failed; retrying next round", self._name)
            elapsed = time.monotonic() - started
            await asyncio.sleep(max(0.01, self.interval_s - elapsed))


class EnginePoller(Periodic):
    """Every round, one concurrent GET per engine in the fleet (scrapes, health checks),
    each with its own timeout."""

    kind = "engine poll"  # names the loop in logs

    def __init__(
        self,
        fleet: Fleet,
        session: aiohttp.ClientSession,
        interval_s: float,
        timeout_s: float,
        headers: dict[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(interval_s, self.kind)
        self._fleet = fleet
        self._session = session
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._headers = headers
        self._clock = clock

    async def run_once(self) -> None:
        states = list(self._fleet.engines.values())
        await asyncio.gather(*(self.poll(s.id, s.record.url) for s in states))

    async def poll(self, engine_id: str, url: str) -> None:
        raise NotImplementedError
