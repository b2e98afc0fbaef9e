"""Small helpers for the Redis registry tests."""

from __future__ import annotations

import time

from deepinfer_router.shared.engine_record import Capacity, EngineRecord
from tests.support.waiting import wait_until


def make_record(port: int, model: str = "sim-model") -> EngineRecord:
    return EngineRecord(
        url=f"http://127.0.0.1:{port}",
        models=[model],
        capacity=Capacity(kv_blocks=2048, block_size=16, max_model_len=8192, max_num_seqs=64),
        labels={"zone": "test"},
        version="test",
        started_at=time.time(),
    )


# One polling helper for the whole suite (it takes plain and async predicates alike).
wait_for = wait_until
wait_for_async = wait_until


class ChangeCounter:
    """on_change callback that counts calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


