"""Engine-side registration: a heartbeat with a TTL into the router's embedded registry
(`http://router:8080`) or a shared Redis (`redis://...`). A clean stop deregisters at once.

Used by `deepinfer-engine sim` and `deepinfer-engine launch` alike.
"""

from __future__ import annotations

import asyncio
import logging
import time

import aiohttp
from pydantic import BaseModel, Field, field_validator

from deepinfer_router.shared.engine_record import EngineRecord
from deepinfer_router.shared.tasks import cancel_and_wait

from .registrar import DEFAULT_HEARTBEAT_S, DEFAULT_TTL_S, Registrar

__all__ = [
    "DEFAULT_HEARTBEAT_S",
    "DEFAULT_TTL_S",
    "HttpRegistrar",
    "Registrar",
    "RegistrationOptions",
    "make_registrar",
]

log = logging.getLogger("deepinfer.engine.registration")


_REGISTRY_SCHEMES = ("http://", "https://", "redis://", "rediss://", "unix://")


class RegistrationOptions(BaseModel):
    """The registry options every engine command shares (`launch`, `sim`)."""

    registry: str | None = Field(
        None, description="Registry: redis://... (shared) or http://router:8080 (a router's "
        "embedded registry). Without it the engine is not registered."
    )
    registry_key: str | None = Field(
        None, description="Admin key of the router's embedded registry."
    )
    registry_namespace: str = Field(
        "deepinfer", min_length=1, description="Key prefix in a Redis registry."
    )
    heartbeat_s: float = Field(
        DEFAULT_HEARTBEAT_S, gt=0, description="Seconds between registry heartbeats."
    )
    registry_ttl_s: float = Field(
        DEFAULT_TTL_S, gt=0,
        description="Seconds the registry keeps the engine without a heartbeat.",
    )

    @field_validator("registry")
    @classmethod
    def _registry_url(cls, url: str | None) -> str | None:
        if url and not url.startswith(_REGISTRY_SCHEMES):
            raise ValueError("must be http(s)://router or redis://... (rediss://, unix://)")
        return url or None

    def make_registrar(self) -> Registrar:
        """The registrar these options describe (`registry` must be set)."""
        if not self.registry:
            raise ValueError("no registry configured")
        return make_registrar(
            self.registry, self.registry_key, heartbeat_s=self.heartbeat_s,
            ttl_s=self.registry_ttl_s, namespace=self.registry_namespace,
        )


class HttpRegistrar:
    """Registers with a router's embedded registry through its admin API."""

    def __init__(
        self,
        router_url: str,
        admin_key: str | None = None,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        ttl_s: float = DEFAULT_TTL_S,
    ) -> None:
        self._base = router_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self._heartbeat_s = heartbeat_s
        self._ttl_s = ttl_s
        self._record: EngineRecord | None = None
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None

    async def _post(self) -> None:
        assert self._record is not None and self._session is not None
        self._record.heartbeat_at = time.time()
        payload = {**self._record.model_dump(mode="json"), "ttl_s": self._ttl_s}
        async with self._session.post(
            f"{self._base}/admin/engines", json=payload, headers=self._headers,
            allow_redirects=False,  # the admin key goes to the router, nowhere else
        ) as resp:
            if resp.status >= 300:
                raise RuntimeError(
                    f"registration at {self._base} refused: {resp.status} {await resp.text()}"
                )

    async def start(self, record: EngineRecord) -> None:
        self._record = record
        self.beats = 0  # heartbeats posted since start (for tests and status lines)
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        await self._post()
        self._task = asyncio.create_task(self._loop())

    async def _loop(self) -> None:
        failing = False
        while True:
            await asyncio.sleep(self._heartbeat_s)
            try:
                await self._post()
                self.beats += 1
                if failing:
                    log.info("registration at %s restored", self._base)
                failing = False
            except (TimeoutError, aiohttp.ClientError, RuntimeError) as exc:
                if not failing:  # log once per outage, not every heartbeat
                    log.warning("heartbeat to %s failed: %s", self._base, exc)
                failing = True

    async def stop(self) -> None:
        registered = self._task is not None  # start() got as far as a first registration
        if self._task is not None:
            await cancel_and_wait(self._task)
        if registered and self._session is not None and self._record is not None:
            try:
                async with self._session.delete(
                    f"{self._base}/admin/engines/{self._record.id}", headers=self._headers,
                    allow_redirects=False,
                ):
                    pass
            except (TimeoutError, aiohttp.ClientError) as exc:
                log.warning("deregistration at %s failed: %s", self._base, exc)
        if self._session is not None:
            await self._session.close()


def make_registrar(
    url: str,
    key: str | None = None,
    *,
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    ttl_s: float = DEFAULT_TTL_S,
    namespace: str = "deepinfer",
) -> Registrar:
    """`http(s)://router` -> the router's embedded registry; `redis://` -> shared Redis."""
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis_registration import RedisRegistrar  # redis only when asked for

        return RedisRegistrar(url, heartbeat_s=heartbeat_s, ttl_s=ttl_s, namespace=namespace)
    if url.startswith(("http://", "https://")):
        return HttpRegistrar(url, key, heartbeat_s=heartbeat_s, ttl_s=ttl_s)
    raise ValueError(f"registry URL must be http(s):// (a router) or redis://: {url!r}")
