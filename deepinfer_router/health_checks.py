"""Active health checks: every engine's `/health`, concurrently, with a timeout. A failed
check takes an engine out of routing; a passing one brings it back. An open circuit
(passive ejection) is not closed by a passing check: after its cool-down one request
goes through as the half-open probe (see Fleet)."""

from __future__ import annotations

import logging

import aiohttp

from .periodic import EnginePoller

log = logging.getLogger("deepinfer.health")


class HealthChecker(EnginePoller):
    kind = "health checks"

    async def poll(self, engine_id: str, url: str) -> None:
        try:
            async with self._session.get(
                f"{url}/health", timeout=self._timeout, headers=self._headers,
                allow_redirects=False,  # a redirect's target is not the engine
            ) as resp:
                ok = resp.status == 200
        except (TimeoutError, aiohttp.ClientError, ValueError):
            ok = False
        state = self._fleet.engines.get(engine_id)
        if state is not None and state.healthy != ok:
            log.warning("engine %s (%s) is %s", engine_id, url, "healthy" if ok else "unhealthy")
        now = self._clock()
        self._fleet.health_result(engine_id, ok, now)
        if self._fleet.check_unanswered(engine_id, now):
            log.warning("engine %s (%s) answered nothing within --first-byte-timeout-s of a "
                        "request its client gave up on: counted as a failure", engine_id, url)
