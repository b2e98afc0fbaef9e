"""What the router starts and stops around serving: pollers, registries, hint sharing.
`app._services` starts them in order and closes them in reverse."""

from __future__ import annotations

from typing import Protocol


class Service(Protocol):
    async def start(self) -> None:
        """Begin in the background; return at once (never wait on a remote part)."""
        ...

    async def close(self) -> None:
        """Stop and release what it holds; safe to call once after start()."""
        ...
