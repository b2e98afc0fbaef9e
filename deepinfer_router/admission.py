"""Admission control: a router-wide concurrency limit with a bounded FIFO wait queue.

Waiters are woken one at a time as slots free up; a request that finds the queue full,
or waits longer than the timeout, is refused (429 with Retry-After)."""

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

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def try_acquire(self) -> bool:
        if self.inflight < self.max_inflight and not self._waiters:
            self.inflight += 1
            return True
        return False

    async def acquire(self) -> None:
        """Take a slot, waiting in line if needed. Raises AdmissionRejected."""
        if self.try_acquire():
            return
        if len(self._waiters) >= self.max_queue:
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

