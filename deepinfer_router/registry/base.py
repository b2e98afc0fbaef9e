"""Registry sources: where the router learns which engines exist.

Each source keeps its own view of engine records and calls `on_change()` when that view
changes; the fleet merges the views of all sources. Sources do I/O; the fleet does not.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from ..fleet import Refusal
from ..shared.engine_record import EngineRecord

OnChange = Callable[[], None]


class RegistryUnavailableError(RuntimeError):
    """A writable registry could not be reached for a write (the admin API answers 503)."""


class RegistrySource(Protocol):
    name: str  # "static" | "local" | "redis"

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def snapshot(self) -> dict[str, EngineRecord]:
        """Engines this source knows now, by id."""
        ...

    def status(self) -> dict[str, Any]:
        """State for /ready and /admin: at least {"backend": name, "up": bool}."""
        ...


class WritableRegistry(RegistrySource, Protocol):
    """A source that the admin API can write to (embedded or Redis)."""

    async def register(self, record: EngineRecord, ttl_s: float | None = None) -> None: ...

    async def deregister(self, engine_id: str) -> bool: ...


class RefusalLog:
    """Logs a record the fleet leaves out when it starts being left out (sync runs on
    every registry change); one that comes back after being fixed is logged again."""

    def __init__(self, log: logging.Logger) -> None:
        self._log = log
        self._current: set[Refusal] = set()

    def report(self, refusals: Iterable[Refusal]) -> None:
        current = set(refusals)
        for refusal in current - self._current:
            self._log.warning(
                "engine %r (%r) from the %s registry left out: %s",
                refusal.engine_id[:200], refusal.url[:200], refusal.source, refusal.reason,
            )
        self._current = current
