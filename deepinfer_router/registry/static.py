"""Static engines from `--engine URL`: the models each serves are read from its
`/v1/models`, retried until the engine answers and refreshed periodically."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp

from ..shared.engine_record import (
    EngineRecord,
    engine_id_for,
    new_instance_id,
    normalize_engine_url,
)
from ..shared.tasks import cancel_and_wait
from .base import OnChange

log = logging.getLogger("deepinfer.registry.static")


async def fetch_models(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> tuple[list[str], int | None]:
    """Served model names and the largest max_model_len from an engine's /v1/models."""
    async with session.get(f"{url}/v1/models", headers=headers, allow_redirects=False) as resp:
        if resp.status != 200:  # a redirect too: engine traffic never follows one
            raise ValueError(f"/v1/models answered {resp.status}")
        payload: Any = await resp.json(content_type=None)
    models: list[str] = []
    max_len: int | None = None
    for entry in payload.get("data", []) if isinstance(payload, dict) else []:
        if isinstance(entry, dict) and isinstance(entry.get("id"), str):
            models.append(entry["id"])
            if isinstance(entry.get("max_model_len"), int):
                max_len = max(max_len or 0, entry["max_model_len"])
    return models, max_len


class StaticRegistry:
    name = "static"

    def __init__(
        self,
        urls: list[str],
        on_change: OnChange,
        session: aiohttp.ClientSession,
        refresh_s: float = 10.0,
        headers: dict[str, str] | None = None,
        epoch: str | None = None,
    ) -> None:
        self._urls = [normalize_engine_url(u) for u in urls]
        self._on_change = on_change
        self._session = session
        self._refresh_s = refresh_s
        self._headers = headers
        now = time.time()
        # Listed at once (state "pending" until their models are known).
        # The instance: this launch's epoch (random; shared by the processes of one
        # --workers router, so that the placements they share apply) and the address.
        # A new launch is a new instance, as it knows nothing of the engine's cache.
        epoch = epoch or new_instance_id()
        self._records = {
            r.id: r for r in (EngineRecord(url=u, instance=f"{epoch}-{engine_id_for(u)}",
                                           started_at=now) for u in self._urls)
        }
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._watch(r.id)) for r in self._records.values()]

    async def close(self) -> None:
        for task in self._tasks:
            await cancel_and_wait(task)

    def snapshot(self) -> dict[str, EngineRecord]:
        return self._records

    def status(self) -> dict[str, Any]:
        return {"backend": "static", "up": True, "engines": len(self._records)}

    async def _watch(self, engine_id: str) -> None:
        delay = 0.2
        failing = False
        while True:
            record = self._records[engine_id]
            try:
                models, max_len = await fetch_models(self._session, record.url, self._headers)
            except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
                if not failing:
                    log.warning("engine %s: cannot read /v1/models: %s", record.url, exc)
                failing = True
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._refresh_s)
                continue
            if failing:
                log.info("engine %s: serving %s", record.url, models)
            failing = False
            delay = 0.2
            capacity = record.capacity.model_copy(update={"max_model_len": max_len})
            if models != record.models or capacity != record.capacity:
                self._records[engine_id] = record.model_copy(
                    update={"models": models, "capacity": capacity}
                )
                self._on_change()
            await asyncio.sleep(self._refresh_s)
