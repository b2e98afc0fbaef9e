"""Stopping background tasks: one way, used by every service of the router and engines."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("deepinfer.tasks")


async def cancel_and_wait(task: asyncio.Task[None], *, every_s: float = 0.05) -> None:
    """Cancel a task and wait until it has really ended.

    Cancelling once is not always enough: redis-py sends commands under asyncio.wait_for,
    which on Python 3.11 drops a cancellation that lands as the send completes (CPython
    gh-86296), so the command just carries on. Re-cancelling until the task is done fixes
    that, and costs nothing for tasks that end at the first cancel.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=every_s)
    if not task.cancelled() and task.exception() is not None:
        log.debug("task %s ended with %r", task.get_name(), task.exception())
