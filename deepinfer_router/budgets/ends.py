"""Telling a shared budget (the owner worker, Redis) that a request ended: in the
background, retried, and idempotent there (an id ends once), so saying it again is safe.

An end that cannot be told is retried for about half a minute, then left to the place's
expiry (the request timeout). An admission whose answer never came is undone the same
way, and said again a little later, for an admission that a stalled store runs only
after the undo."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

RETRY_DELAYS_S = (0.0, 1.0, 5.0, 30.0)
UNDO_AGAIN_S = (1.0, 5.0)

# Tells the store that request `rid` (of `tenant`, charged `tokens`) ended having used
# `used` tokens (None: not reported); True once the store heard it.
Tell = Callable[[str, str, int, int | None], Awaitable[bool]]


class Ends:
    def __init__(self, tell: Tell) -> None:
        self._tell = tell
        self._tasks: set[asyncio.Task[Any]] = set()

    async def admission(self, ask: Awaitable[T | None], tenant: str, rid: str, tokens: int,
                        timeout_s: float | None = None,
                        on_failure: Callable[[Exception], None] | None = None) -> T | None:
        """The store's answer to admitting request `rid`, or None when it gave none
        (failed, or not within `timeout_s`): the admission is undone then, since the
        store may have made it all the same. Shielded: a client that leaves while the
        store answers has its place given back rather than left taken."""
        call = asyncio.ensure_future(ask)
        try:
            answer = await asyncio.wait_for(asyncio.shield(call), timeout_s)
        except asyncio.CancelledError:
            call.add_done_callback(lambda _t: self.undo(tenant, rid, tokens))
            raise
        except Exception as exc:
            call.add_done_callback(lambda _t: self.undo(tenant, rid, tokens))
            if on_failure is not None:
                on_failure(exc)
            return None
        if answer is None:
            self.undo(tenant, rid, tokens)
        return answer

    def finish(self, tenant: str, rid: str, tokens: int, used: int | None,
               delays: tuple[float, ...] = RETRY_DELAYS_S) -> None:
        task = asyncio.ensure_future(self._until_told(tenant, rid, tokens, used, delays))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def undo(self, tenant: str, rid: str, tokens: int) -> None:
        """Take back an admission whose answer did not come (it used nothing)."""
        self.finish(tenant, rid, tokens, 0)
        for delay in UNDO_AGAIN_S:
            self.finish(tenant, rid, tokens, 0, (delay,))

    async def _until_told(self, tenant: str, rid: str, tokens: int, used: int | None,
                          delays: tuple[float, ...]) -> None:
        for delay in delays:
            if delay:
                await asyncio.sleep(delay)
            if await self._tell(tenant, rid, tokens, used):
                return

    async def close(self, timeout_s: float = 1.0) -> None:
        """Wait a little for ends on their way out; later retries are dropped (their
        places expire in the store)."""
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=timeout_s)
        for task in list(self._tasks):
            task.cancel()
