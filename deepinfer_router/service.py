"""What the router starts and stops around serving: pollers, registries, hint sharing.
`app._services` starts them in order and closes them in reverse."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol


class Service(Protocol):
    async def start(self) -> None:
        """Begin in the background; return at once (never wait on a remote part)."""
        ...

    async def close(self) -> None:
        """Stop and release what it holds; safe to call once after start()."""
        ...


class Closing:
    """A part started elsewhere (a simulated engine) that is closed with the services."""

    def __init__(self, close: Callable[[], Awaitable[None]]) -> None:
        self._close = close

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        await self._close()
