"""Event-loop lag: how late a periodic timer fires. Anything that holds the loop (a body
parsed in one go, a slow callback) shows up here before it shows up as latency, and the
hostile-input benchmark reads it to check that no request stalls the router."""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class LoopLagProbe:
    """Every `interval_s`, a timer on the running loop reports how late it fired.
    One `call_at` per period: no task, nothing on the request path."""

    def __init__(self, interval_s: float, observe: Callable[[float], None]) -> None:
        self._interval = interval_s
        self._observe = observe
        self._loop: asyncio.AbstractEventLoop | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._due = 0.0

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._schedule(self._loop.time())

    def _schedule(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + self._interval
        self._handle = self._loop.call_at(self._due, self._fire)

    def _fire(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self._observe(max(0.0, now - self._due))
        self._schedule(now)

    async def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
