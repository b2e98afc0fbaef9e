"""Small helpers for the Redis registry tests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from deepinfer_router.engine_record import Capacity, EngineRecord


def make_record(port: int, model: str = "sim-model") -> EngineRecord:
    return EngineRecord(
        url=f"http://127.0.0.1:{port}",
        models=[model],
        capacity=Capacity(kv_blocks=2048, block_size=16, max_model_len=8192, max_num_seqs=64),
        labels={"zone": "test"},
        version="test",
        started_at=time.time(),
    )


async def wait_for(
    predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.01
) -> float:
    """Wait until predicate() holds; returns the seconds waited, raises on timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(interval_s)
    return time.monotonic() - start


class ChangeCounter:
    """on_change callback that counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


async def wait_for_async(
    predicate: Callable[[], Awaitable[bool]], timeout_s: float, interval_s: float = 0.01
) -> float:
    """wait_for with an async predicate (e.g. a Redis query)."""
    start = time.monotonic()
    while not await predicate():
        if time.monotonic() - start > timeout_s:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(interval_s)
    return time.monotonic() - start
