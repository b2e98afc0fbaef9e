"""Admission control: a router-wide concurrency limit and a per-engine one, sharing one
bounded wait queue.

A request first takes a router-wide slot (FIFO waiters, woken one at a time as slots
free up). Then, when every engine that serves its model is at --max-inflight-per-engine,
it waits for an engine slot in the same queue (per model, woken when a request to an
engine serving that model finishes). A request that finds the queue full, or waits
longer than --queue-timeout-s in all, is refused (429 with Retry-After). Neither wait
costs anything while there is room."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque


class AdmissionRejected(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # "queue_full" | "queue_timeout"


class Admission:
    def __init__(self, max_inflight: int, max_queue: int, queue_timeout_s: float) -> None:
        self.max_inflight = max_inflight
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.inflight = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        # model -> requests waiting for a slot on an engine serving it
        self._engine_waiters: dict[str, deque[asyncio.Future[None]]] = {}
        self.engine_waiting = 0
        self._idle: asyncio.Event | None = None  # set up by wait_idle (shutdown)

    @property
    def queued(self) -> int:
        return len(self._waiters) + self.engine_waiting

    def try_acquire(self) -> bool:
        if self.inflight < self.max_inflight and not self._waiters:
            self.inflight += 1
            return True
        return False

    async def acquire(self) -> None:
        """Take a slot, waiting in line if needed. Raises AdmissionRejected."""
        if self.try_acquire():
            return
        if self.queued >= self.max_queue:
            raise AdmissionRejected("queue_full")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await asyncio.wait_for(asyncio.shield(fut), self.queue_timeout_s)
        except (TimeoutError, asyncio.CancelledError) as exc:
            if fut.done() and not fut.cancelled():
                # The slot was handed over just as we gave up: give it back.
                self.release()
            else:
                fut.cancel()
                with contextlib.suppress(ValueError):
                    self._waiters.remove(fut)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise AdmissionRejected("queue_timeout") from None

    def release(self) -> None:
        # Hand the slot straight to the next live waiter, so it cannot be stolen.
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.inflight -= 1
        if self._idle is not None and self.inflight == 0:
            self._idle.set()

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request holds a slot (graceful shutdown); False on timeout."""
        if self.inflight == 0:
            return True
        self._idle = idle = asyncio.Event()
        try:
            await asyncio.wait_for(idle.wait(), max(timeout_s, 0.0))
        except TimeoutError:
            return False
        return True


    async def wait_engine_slot(self, model: str, timeout_s: float, front: bool = False) -> None:
        """Wait until a request to an engine serving `model` finishes (the caller then
        looks for a free engine again). `front`: a request woken before that found no room
        after all keeps its place. Raises AdmissionRejected."""
        if not front and self.queued >= self.max_queue:
            raise AdmissionRejected("queue_full")
        if timeout_s <= 0:
            raise AdmissionRejected("queue_timeout")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._engine_waiters.get(model)
        if waiters is None:
            waiters = self._engine_waiters[model] = deque()
        if front:
            waiters.appendleft(fut)
        else:
            waiters.append(fut)
        self.engine_waiting += 1
        try:
            await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            raise AdmissionRejected("queue_timeout") from None
        finally:
            self.engine_waiting -= 1
            if not fut.done():
                fut.cancel()
            with contextlib.suppress(ValueError):
                waiters.remove(fut)
            if not waiters and self._engine_waiters.get(model) is waiters:
                del self._engine_waiters[model]

    def engine_slot_freed(self, models: list[str]) -> None:
        """A request to an engine serving `models` finished: wake the first waiter of
        each (call only when `engine_waiting`)."""
        for model in models:
            waiters = self._engine_waiters.get(model)
            while waiters:
                fut = waiters.popleft()
                if not fut.done():
                    fut.set_result(None)
                    break
