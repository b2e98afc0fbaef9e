"""Fixtures for the Redis registry tests: a real redis-server on a free loopback port.

Skipped locally when redis-server is missing; with CI=true a missing server fails.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[3]
if str(_ROOT) not in sys.path:  # `tests.support` importable under plain `pytest` too
    sys.path.insert(0, str(_ROOT))

from tests.support.redis_server import RedisServer, redis_server_path  # noqa: E402


def _require_redis_server() -> None:
    if redis_server_path() is None:
        # Under CI this skip fails the run (tests/conftest.py).
        pytest.skip("redis-server not installed")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.redis)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A fresh server per test: tests kill and restart it, so none is shared."""
    _require_redis_server()
    server = RedisServer()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def auth_redis_server() -> Iterator[RedisServer]:
    _require_redis_server()
    server = RedisServer(password="s3cret-pass")
    try:
        yield server
    finally:
        server.close()
