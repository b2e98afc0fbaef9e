"""Registration options every engine command shares (`launch`, `sim`), and the registrar
they describe: a heartbeat with a TTL into a router's embedded registry
(`http://router:8080`, this module's `RouterBackend`) or a shared Redis (`redis://...`,
redis_registration.py). A clean stop deregisters at once. The heartbeat itself:
registrar.py."""

from __future__ import annotations

import aiohttp
from pydantic import BaseModel, Field, field_validator, model_validator

from deepinfer_router.shared.engine_record import EngineRecord
from deepinfer_router.shared.registry_url import registry_kind

from .registrar import DEFAULT_HEARTBEAT_S, DEFAULT_TTL_S, Registrar, RegistrationFailed

__all__ = [
    "DEFAULT_HEARTBEAT_S",
    "DEFAULT_TTL_S",
    "HttpRegistrar",
    "Registrar",
    "RegistrationOptions",
    "RouterBackend",
    "make_registrar",
]


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
        if url:
            try:
                registry_kind(url)
            except ValueError:
                raise ValueError(
                    "must be http(s)://router or redis://... (rediss://, unix://)"
                ) from None
        return url or None

    @model_validator(mode="after")
    def _beats_within_ttl(self) -> RegistrationOptions:
        if self.registry_ttl_s <= self.heartbeat_s:
            raise ValueError(
                "registry_ttl_s must be longer than heartbeat_s (about 3 heartbeats per TTL)"
            )
        return self

    def make_registrar(self) -> Registrar:
        """The registrar these options describe (`registry` must be set)."""
        if not self.registry:
            raise ValueError("no registry configured")
        return make_registrar(
            self.registry, self.registry_key, heartbeat_s=self.heartbeat_s,
            ttl_s=self.registry_ttl_s, namespace=self.registry_namespace,
        )


class RouterBackend:
    """A router's embedded registry, through its admin API (POST and DELETE
    /admin/engines with the admin key; never following a redirect, so the key goes to
    the router and nowhere else)."""

    def __init__(self, router_url: str, admin_key: str | None = None) -> None:
        self._base = router_url.rstrip("/")
        self.where = f"at {self._base}"
        self._headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        return self._session

    async def write(self, record: EngineRecord, ttl_s: float, *, first: bool) -> None:
        payload = {**record.model_dump(mode="json"), "ttl_s": ttl_s}
        try:
            async with self._client().post(
                f"{self._base}/admin/engines", json=payload, headers=self._headers,
                allow_redirects=False,
            ) as resp:
                if resp.status >= 300:
                    raise RegistrationFailed(
                        f"registration at {self._base} refused: {resp.status} "
                        f"{(await resp.text())[:500]}"
                    )
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise RegistrationFailed(f"registration at {self._base} failed: {exc}") from exc

    async def delete(self, record: EngineRecord) -> None:
        try:
            async with self._client().delete(
                f"{self._base}/admin/engines/{record.id}", headers=self._headers,
                allow_redirects=False,
            ):
                pass
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise RegistrationFailed(str(exc)) from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class HttpRegistrar(Registrar):
    """A registrar on a router's embedded registry."""

    def __init__(
        self,
        router_url: str,
        admin_key: str | None = None,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        ttl_s: float = DEFAULT_TTL_S,
    ) -> None:
        super().__init__(RouterBackend(router_url, admin_key), heartbeat_s=heartbeat_s,
                         ttl_s=ttl_s)


def make_registrar(
    url: str,
    key: str | None = None,
    *,
    heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    ttl_s: float = DEFAULT_TTL_S,
    namespace: str = "deepinfer",
) -> Registrar:
    """`http(s)://router` -> the router's embedded registry; `redis://` -> shared Redis."""
    if registry_kind(url) == "redis":
        from .redis_registration import RedisRegistrar  # redis only when asked for

        return RedisRegistrar(url, heartbeat_s=heartbeat_s, ttl_s=ttl_s, namespace=namespace)
    return HttpRegistrar(url, key, heartbeat_s=heartbeat_s, ttl_s=ttl_s)
