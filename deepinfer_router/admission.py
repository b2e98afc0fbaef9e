"""Admission control: a router-wide concurrency limit and a per-engine one, sharing one
bounded wait queue.

A request first takes a router-wide slot; when none is free it waits in the fair queue
(fairness/queue.py: classes by priority with aging, weighted fair queueing across
tenants, each request charged the prompt tokens it is expected not to find cached), and
waiters are woken one at a time, in that order, as slots free up. Then, when every
engine that serves its model is at --max-inflight-per-engine, it waits for an engine
slot in the same queue (per model, in arrival order, woken when a request to an engine
serving that model finishes, or when such an engine joins, comes back or is
un-drained). A request that finds the queue full, or waits longer than
--queue-timeout-s in all, is refused (429 with Retry-After). Neither wait costs anything
while there is room."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import math
import time
from collections.abc import Callable

from .fairness.queue import DEFAULT_CLASSES, FairQueue


class AdmissionRejected(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # "queue_full" | "queue_timeout"


class Admission:
    def __init__(self, max_inflight: int, max_queue: int, queue_timeout_s: float,
                 fair: FairQueue | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 class_reserve: float = 0.0) -> None:
        self.max_inflight = max_inflight
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.inflight = 0
        self._waiters = fair if fair is not None else FairQueue()  # (an empty one is falsy)
        # The reserve: the requests of rank r and below (lower classes) may hold at most
        # limits[r] slots, r x the reserve less than all, so that a request of a higher
        # class finds a slot at once rather than waiting for one to free. Higher classes'
        # requests do not count against a lower class's limit: however busy they are, a
        # lower class keeps its share of what is left (aging still orders the classes
        # that may take a slot; nothing is starved).
        ranks = len(DEFAULT_CLASSES) if fair is None else fair.class_count
        per_rank = math.ceil(max_inflight * class_reserve) if class_reserve > 0 else 0
        self._limits = [max(max_inflight - per_rank * r, 1) for r in range(ranks)]
        self._reserve = per_rank > 0 and ranks > 1
        self._held = [0] * ranks  # slots held per rank
        self._clock = clock
        # model -> (ticket, future) of the requests waiting for a slot on an engine
        # serving it, in ticket order (at most max_queue entries in all)
        self._engine_waiters: dict[str, list[tuple[int, asyncio.Future[None]]]] = {}
        self.engine_waiting = 0
        self._tickets = 0
        self._idle: asyncio.Event | None = None  # set up by wait_idle (shutdown)

    @property
    def queued(self) -> int:
        return len(self._waiters) + self.engine_waiting

    def _rank(self, klass: str) -> int:
        return self._waiters.rank(klass) if self._reserve else 0

    def _may_take(self, rank: int, in_use: int) -> bool:
        """Whether a request of `rank` may take a slot with `in_use` slots held."""
        if in_use >= self.max_inflight:
            return False
        return not self._reserve or rank == 0 or sum(self._held[rank:]) < self._limits[rank]

    def try_acquire(self, klass: str = "standard") -> bool:
        """A slot at once, when `klass` may take one and no request of its class or
        above that may take one waits for one."""
        if not self._reserve:  # (the hot path: no per-class counts)
            if self.inflight < self.max_inflight and not self._waiters:
                self.inflight += 1
                return True
            return False
        rank = self._rank(klass)
        in_use = self.inflight
        if self._may_take(rank, in_use) and not (self._waiters and (
                self._waiters.waiting_at_or_above(
                    rank, lambda r: self._may_take(r, in_use)))):
            self.inflight += 1
            self._held[rank] += 1
            return True
        return False

    async def acquire(self, tenant: str = "default", klass: str = "standard",
                      cost: float = 1.0) -> None:
        """Take a slot, waiting in the fair queue if needed (as `tenant`'s request of
        class `klass`, charged `cost`). Raises AdmissionRejected."""
        if self.try_acquire(klass):
            return
        if self.queued >= self.max_queue:
            raise AdmissionRejected("queue_full")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        item = self._waiters.push(fut, tenant, klass, cost, self._clock())
        try:
            await _wait(fut, self.queue_timeout_s)
        except BaseException:
            if _handed_over(fut):
                # The slot was handed over just as we gave up (timed out, or the client
                # left): give it back, to the next waiter.
                self.release(klass)
            else:
                self._waiters.remove(item)
            raise

    def release(self, klass: str = "standard") -> None:
        """A request of class `klass` gives its slot back."""
        reserve = self._reserve
        allowed = None
        if reserve:
            self._held[self._rank(klass)] -= 1
            in_use = self.inflight - 1
            allowed = lambda r: self._may_take(r, in_use)  # noqa: E731
        # Hand the slot straight to the next live waiter that may take it (the reserve),
        # so it cannot be stolen.
        while self._waiters:
            item = self._waiters.pop(self._clock(), allowed)
            if item is None:
                break
            fut = item.key
            assert isinstance(fut, asyncio.Future)
            if not fut.done():
                if reserve:
                    self._held[self._rank(item.klass)] += 1
                fut.set_result(None)
                return
        self.inflight -= 1
        if self._idle is not None and self.inflight == 0:
            self._idle.set()

    def correct(self, tenant: str, klass: str, charged: float, actual: float) -> None:
        """A request that waited was charged `charged` and cost `actual` (FairQueue)."""
        self._waiters.correct(tenant, klass, charged, actual)

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

    def engine_ticket(self) -> int:
        """A place in line for the engine-slot wait, kept across wake-ups (FIFO order)."""
        self._tickets += 1
        return self._tickets

    async def wait_engine_slot(
        self, model: str, timeout_s: float, ticket: int, requeue: bool = False
    ) -> None:
        """Wait until an engine serving `model` may have room: a request to one finished,
        or one joined, came back or was un-drained (the caller then looks for a free
        engine again). `requeue`: a waiter woken before that found no room after all
        goes back to its `ticket`'s place in line, not to the end. Raises
        AdmissionRejected."""
        if not requeue and self.queued >= self.max_queue:
            raise AdmissionRejected("queue_full")
        if timeout_s <= 0:
            raise AdmissionRejected("queue_timeout")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        waiters = self._engine_waiters.get(model)
        if waiters is None:
            waiters = self._engine_waiters[model] = []
        entry = (ticket, fut)
        bisect.insort(waiters, entry, key=_ticket_of)  # tickets are unique
        self.engine_waiting += 1
        try:
            await _wait(fut, timeout_s)
        except BaseException:
            if _handed_over(fut):
                # Woken, then timed out or cancelled (the client left) before running:
                # the wake-up is the next waiter's, or it would sit until its timeout.
                self._wake_next(waiters, fut)
            raise
        finally:
            self.engine_waiting -= 1
            with contextlib.suppress(ValueError):
                waiters.remove(entry)
            if not waiters and self._engine_waiters.get(model) is waiters:
                del self._engine_waiters[model]

    @staticmethod
    def _wake_next(waiters: list[tuple[int, asyncio.Future[None]]],
                   after: asyncio.Future[None]) -> None:
        for _, fut in waiters:
            if fut is not after and not fut.done():
                fut.set_result(None)
                return

    def engine_slot_freed(self, models: list[str]) -> None:
        """A request to an engine serving `models` finished: wake the first waiter of
        each (call only when `engine_waiting`)."""
        for model in models:
            for _, fut in self._engine_waiters.get(model, ()):
                if not fut.done():
                    fut.set_result(None)
                    break

    def engines_available(self, models: list[str]) -> None:
        """An engine serving `models` joined, restarted, passed its health check again or
        was un-drained: it may take several requests, so wake every waiter of each
        model; those that find no room go back to their place in line."""
        if not self.engine_waiting:
            return
        for model in models:
            for _, fut in self._engine_waiters.get(model, ()):
                if not fut.done():
                    fut.set_result(None)


async def _wait(fut: asyncio.Future[None], timeout_s: float) -> None:
    """Await `fut` for at most `timeout_s`, raising AdmissionRejected("queue_timeout").

    Not asyncio.wait_for: when `fut` completes and the waiting task is cancelled in the
    same loop turn, wait_for swallows the cancel on Python 3.11 (the request goes on
    though its client left) and raises it on 3.12+. Here the cancel is always raised,
    with `fut` done, so the caller can pass on what it was handed (same on every
    version). The timeout is a timer that fails `fut`, so it never races the hand-over."""
    timer = asyncio.get_running_loop().call_later(timeout_s, _expire, fut)
    try:
        await fut
    finally:
        timer.cancel()


def _handed_over(fut: asyncio.Future[None]) -> bool:
    """`fut` got its slot or wake-up (not cancelled, not timed out)."""
    return fut.done() and not fut.cancelled() and fut.exception() is None


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(AdmissionRejected("queue_timeout"))


def _ticket_of(entry: tuple[int, asyncio.Future[None]]) -> int:
    return entry[0]
