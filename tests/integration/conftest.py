"""Integration tests run on uvloop, the loop the router runs on in production (its
transports are other classes than asyncio's)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import pytest
import uvloop

from tests.support.sim_fleet import sims  # noqa: F401 - a fixture for the tests here


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], Any]]:
    return {"uvloop": uvloop.new_event_loop}
