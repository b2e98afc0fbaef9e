"""`deepinfer-engine list --registry URL`: the engines registered in a shared Redis or in a
router's embedded registry (GET /admin/engines)."""

from __future__ import annotations

from typing import Any

import aiohttp
from pydantic import ValidationError
from redis.exceptions import RedisError

from deepinfer_router.shared import redis_store as store
from deepinfer_router.shared.engine_record import EngineRecord
from deepinfer_router.shared.registry_url import registry_kind


async def list_registered(
    url: str, key: str | None = None, namespace: str = "deepinfer"
) -> list[EngineRecord]:
    """Registered engines, sorted by id. Raises RuntimeError when the registry cannot be
    read (unreachable, refused, or an answer that is not a list of engine records)."""
    if registry_kind(url) == "redis":
        records = await _from_redis(url, namespace)
    else:
        records = await _from_router(url, key)
    return sorted(records, key=lambda r: r.id)


async def _from_redis(url: str, namespace: str) -> list[EngineRecord]:
    client = store.connect(url)
    try:
        # Read only: listing must not prune the index behind the routers' backs.
        found = await store.read_all(client, store.Keys(namespace), prune=False)
    except (RedisError, OSError) as exc:
        raise RuntimeError(f"cannot read the Redis registry: {exc}") from exc
    finally:
        await client.aclose()
    return [stored.record for stored in found.values()]


def _records_from_json(payload: Any) -> list[EngineRecord]:
    """Accepts a list of records, {"engines": [...]}, or {"engines": {id: ...}}; an item
    may carry its record under "record" next to router state (health, load, ...)."""
    items: Any = payload.get("engines", payload) if isinstance(payload, dict) else payload
    if isinstance(items, dict):
        items = list(items.values())
    if not isinstance(items, list):
        raise RuntimeError("unexpected /admin/engines answer: no engine list")
    records = []
    for item in items:
        if isinstance(item, dict) and isinstance(item.get("record"), dict):
            item = item["record"]
        try:
            records.append(EngineRecord.model_validate(item))
        except ValidationError as exc:
            raise RuntimeError(f"unexpected engine record in /admin/engines: {exc}") from exc
    return records


async def _from_router(url: str, key: str | None) -> list[EngineRecord]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    timeout = aiohttp.ClientTimeout(total=10)
    try:
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.get(f"{url.rstrip('/')}/admin/engines", headers=headers) as resp,
        ):
            if resp.status >= 300:
                raise RuntimeError(
                    f"{url}/admin/engines answered {resp.status}: {(await resp.text())[:200]}"
                )
            payload = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise RuntimeError(f"cannot reach the router at {url}: {exc}") from exc
    return _records_from_json(payload)
