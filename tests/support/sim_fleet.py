"""Three in-process simulated engines (fast clock, unregistered), for the HTTP tests of
routing and of its decisions."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from deepinfer_engine.sim.server import SimServer, start_sim_server
from deepinfer_engine.sim.settings import SimSettings

MODEL = "sim-model"


@pytest.fixture
async def sims() -> AsyncIterator[list[SimServer]]:
    started = [
        await start_sim_server(
            SimSettings(model=MODEL, kv_blocks=4096, speed=20.0, seed=i), register=False
        )
        for i in range(3)
    ]
    yield started
    for sim in started:
        await sim.close()
