"""The embedded registry: engines registered through `POST /admin/engines`, kept in
memory with a TTL that each heartbeat renews."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from ..periodic import Periodic
from ..shared.engine_record import EngineRecord
from .base import OnChange


class LocalRegistry(Periodic):
    """Expired registrations are swept every quarter second."""

    name = "local"

    def __init__(
        self,
        on_change: OnChange,
        default_ttl_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(0.25, "embedded registry expiry")
        self._on_change = on_change
        self._default_ttl_s = default_ttl_s
        self._clock = clock
        self._records: dict[str, EngineRecord] = {}
        self._expires: dict[str, float] = {}

    async def run_once(self) -> None:
        self.expire(self._clock())

    def snapshot(self) -> dict[str, EngineRecord]:
        return self._records

    def leases(self) -> list[tuple[EngineRecord, float]]:
        """Every registration with the seconds it has left (for a --workers sibling
        that starts again and must see the same engines)."""
        now = self._clock()
        return [(r, self._expires[eid] - now) for eid, r in self._records.items()
                if self._expires.get(eid, 0.0) > now]

    def status(self) -> dict[str, Any]:
        return {"backend": "local", "up": True, "engines": len(self._records)}

    async def register(self, record: EngineRecord, ttl_s: float | None = None) -> None:
        now = self._clock()
        record.heartbeat_at = now
        previous = self._records.get(record.id)
        self._records[record.id] = record
        self._expires[record.id] = now + (ttl_s or self._default_ttl_s)
        # A heartbeat of an unchanged engine does not need a fleet resync.
        if previous is None or previous.model_dump(exclude={"heartbeat_at"}) != record.model_dump(
            exclude={"heartbeat_at"}
        ):
            self._on_change()

    async def deregister(self, engine_id: str) -> bool:
        if self._records.pop(engine_id, None) is None:
            return False
        self._expires.pop(engine_id, None)
        self._on_change()
        return True

    def expire(self, now: float) -> list[str]:
        gone = [engine_id for engine_id, at in self._expires.items() if at <= now]
        for engine_id in gone:
            self._records.pop(engine_id, None)
            self._expires.pop(engine_id, None)
        if gone:
            self._on_change()
        return gone
