"""Registration into a shared Redis: the whole record rewritten as a hash with a TTL on
every heartbeat (so a restarted Redis has it back within one heartbeat), an index entry,
and an `up` hint on the change stream. A clean stop deletes it and says `down`. Key
layout: deepinfer_router/shared/redis_store.py; the heartbeat: registrar.py."""

from __future__ import annotations

from redis.exceptions import RedisError

from deepinfer_router.shared import redis_store as store
from deepinfer_router.shared.engine_record import EngineRecord
from deepinfer_router.shared.registry_url import redact

from .registrar import DEFAULT_HEARTBEAT_S, DEFAULT_TTL_S, Registrar, RegistrationFailed


class RedisBackend:
    def __init__(self, url: str, namespace: str, socket_timeout: float) -> None:
        self.where = f"in {redact(url)}"
        self._keys = store.Keys(namespace)
        self.redis = store.connect(url, socket_timeout=socket_timeout)

    async def write(self, record: EngineRecord, ttl_s: float, *, first: bool) -> None:
        try:
            await store.write_record(self.redis, self._keys, record, ttl_s, announce=first)
        except (RedisError, OSError) as exc:
            raise RegistrationFailed(f"registration {self.where} failed: {exc}") from exc

    async def delete(self, record: EngineRecord) -> None:
        try:
            await store.delete_record(self.redis, self._keys, record.id, instance=record.instance)
        except (RedisError, OSError) as exc:
            raise RegistrationFailed(str(exc)) from exc

    async def close(self) -> None:
        await self.redis.aclose()


class RedisRegistrar(Registrar):
    """A registrar on a shared Redis."""

    def __init__(
        self,
        url: str,
        *,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        ttl_s: float = DEFAULT_TTL_S,
        namespace: str = "deepinfer",
    ) -> None:
        # A write must finish well within a heartbeat, or the loop falls behind the TTL.
        backend = RedisBackend(url, namespace, socket_timeout=min(2.0, heartbeat_s))
        super().__init__(backend, heartbeat_s=heartbeat_s, ttl_s=ttl_s)
