"""What every registry client is: the `Registrar` protocol and the default timing. Both
clients (registration.py's HttpRegistrar, redis_registration.py's RedisRegistrar) build
on this module, not on each other."""

from __future__ import annotations

from typing import Protocol

from deepinfer_router.shared.engine_record import EngineRecord

DEFAULT_HEARTBEAT_S = 2.0
DEFAULT_TTL_S = 6.0


class Registrar(Protocol):
    async def start(self, record: EngineRecord) -> None:
        """Register now (raising if the first attempt fails) and keep heart-beating."""
        ...

    async def stop(self) -> None:
        """Stop heart-beating and deregister."""
        ...
