"""Redis key layout and record (de)serialisation, shared by the engine-side registrar,
the router-side registry and `deepinfer-engine list`. One place, so both sides agree.

Keys (all under `{namespace}:` so several fleets can share one Redis):

- `{ns}:engine:{id}`  hash, one field per engine-record field, each value JSON-encoded,
                      plus `ttl_s` and `v` (layout version). PEXPIRE'd to the TTL and
                      rewritten whole on every heartbeat, so a restarted (empty) Redis has
                      it back within one heartbeat.
- `{ns}:engines`      set of engine ids (index). An id may outlive its hash by a little;
                      readers prune ids whose hash is gone.
- `{ns}:events`       stream (MAXLEN ~ 1000) of change hints: `op` (`up` | `down`), `id`,
                      `instance`. Only a hint: readers re-read the hash; correctness never
                      depends on seeing every entry.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from .engine_record import EngineRecord

log = logging.getLogger("deepinfer.registry.redis")

LAYOUT_VERSION = 1
EVENTS_MAXLEN = 1000
RECORD_FIELDS = tuple(EngineRecord.model_fields)

# Delete the index entry only if the hash is really gone, atomically: a registration
# racing with the prune must not lose its index entry.
_PRUNE_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.call('SREM', KEYS[2], ARGV[1])
end
return 0
"""


@dataclass(frozen=True, slots=True)
class Keys:
    namespace: str

    def engine(self, engine_id: str) -> str:
        return f"{self.namespace}:engine:{engine_id}"

    @property
    def index(self) -> str:
        return f"{self.namespace}:engines"

    @property
    def events(self) -> str:
        return f"{self.namespace}:events"

    @property
    def engine_prefix(self) -> str:
        return f"{self.namespace}:engine:"


@dataclass(slots=True)
class StoredRecord:
    record: EngineRecord
    ttl_s: float
    pttl_ms: int  # remaining TTL when read; -1 = no expiry


def connect(url: str, *, socket_timeout: float = 2.0, health_check_s: int = 10) -> aioredis.Redis:
    """A client with bounded socket timeouts and no silent retries.

    Retries are off on purpose: a reconnect may land on a restarted, empty Redis, and the
    caller's own loop must see the error so it can back off and resync (full read, run_id
    check) instead of a command quietly succeeding against a different server.
    AUTH, TLS (`rediss://`), db number and unix sockets all come from the URL.
    """
    return aioredis.Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=socket_timeout,
        socket_connect_timeout=min(socket_timeout, 2.0),
        socket_keepalive=True,
        health_check_interval=health_check_s,
        retry=Retry(NoBackoff(), 0),
        retry_on_timeout=False,
        client_name="deepinfer",
    )


def encode_record(record: EngineRecord, ttl_s: float) -> dict[str, str]:
    data = record.model_dump(mode="json")
    fields = {name: orjson.dumps(value).decode() for name, value in data.items()}
    fields["ttl_s"] = orjson.dumps(float(ttl_s)).decode()
    fields["v"] = str(LAYOUT_VERSION)
    return fields


def decode_record(fields: dict[str, str]) -> tuple[EngineRecord, float] | None:
    """(record, ttl_s) from a hash, or None if empty or malformed (logged)."""
    if not fields:
        return None
    try:
        data: dict[str, Any] = {
            name: orjson.loads(value) for name, value in fields.items() if name != "v"
        }
        ttl_s = float(data.pop("ttl_s", 0.0) or 0.0)
        return EngineRecord.model_validate(data), ttl_s
    except (orjson.JSONDecodeError, ValidationError, TypeError, ValueError) as exc:
        log.warning("ignoring malformed engine record in Redis: %s", exc)
        return None


def encode_instance(instance: str) -> str:
    """An instance id as stored in the hash (JSON-encoded like every field)."""
    return orjson.dumps(instance).decode()


def ttl_ms(ttl_s: float) -> int:
    return max(1, round(ttl_s * 1000))


async def write_record(
    r: aioredis.Redis, keys: Keys, record: EngineRecord, ttl_s: float, *, announce: bool = False
) -> bool:
    """Rewrite the whole hash + PEXPIRE + index in one MULTI. Announces `up` on the
    stream when asked, or when the stored instance differs (new engine, restarted engine,
    or a Redis that lost the key). Returns whether it announced."""
    key = keys.engine(record.id)
    fields = encode_record(record, ttl_s)
    instance = fields["instance"]
    async with r.pipeline(transaction=True) as pipe:
        pipe.hget(key, "instance")  # the value before this write (MULTI runs in order)
        pipe.delete(key)
        pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
        pipe.pexpire(key, ttl_ms(ttl_s))
        pipe.sadd(keys.index, record.id)
        res = await pipe.execute()
    if announce or res[0] != instance:
        await publish(r, keys, "up", record.id, record.instance)
        return True
    return False


async def publish(r: aioredis.Redis, keys: Keys, op: str, engine_id: str, instance: str) -> None:
    await r.xadd(
        keys.events,
        {"op": op, "id": engine_id, "instance": instance},
        maxlen=EVENTS_MAXLEN,
        approximate=True,
    )


async def delete_record(
    r: aioredis.Redis, keys: Keys, engine_id: str, *, instance: str | None = None
) -> bool:
    """Delete an engine's hash and index entry and announce `down`. With `instance`, only
    if the stored record is still that instance (a restarted engine must not be removed
    by its predecessor's late stop). Returns whether a hash was deleted."""
    key = keys.engine(engine_id)
    if instance is not None:
        stored = await r.hget(key, "instance")
        if stored is not None and stored != encode_instance(instance):
            return False
    async with r.pipeline(transaction=True) as pipe:
        pipe.delete(key)
        pipe.srem(keys.index, engine_id)
        pipe.xadd(
            keys.events,
            {"op": "down", "id": engine_id, "instance": instance or ""},
            maxlen=EVENTS_MAXLEN,
            approximate=True,
        )
        res = await pipe.execute()
    return bool(res[0])


async def read_records(
    r: aioredis.Redis, keys: Keys, engine_ids: list[str]
) -> dict[str, StoredRecord | None]:
    """HGETALL + PTTL for each id in one round trip; None where the hash is gone."""
    out: dict[str, StoredRecord | None] = {}
    if not engine_ids:
        return out
    async with r.pipeline(transaction=False) as pipe:
        for engine_id in engine_ids:
            key = keys.engine(engine_id)
            pipe.hgetall(key)
            pipe.pttl(key)
        res = await pipe.execute()
    for i, engine_id in enumerate(engine_ids):
        decoded = decode_record(res[2 * i])
        if decoded is None or decoded[0].id != engine_id:
            out[engine_id] = None
            continue
        record, ttl_s = decoded
        out[engine_id] = StoredRecord(record, ttl_s, int(res[2 * i + 1]))
    return out


async def read_all(r: aioredis.Redis, keys: Keys, *, prune: bool = True) -> dict[str, StoredRecord]:
    """Every live engine: the index, then each hash. Ids whose hash expired are pruned
    from the index (atomically, see _PRUNE_LUA)."""
    ids = sorted(str(i) for i in await r.smembers(keys.index))  # type: ignore[misc]
    found = await read_records(r, keys, ids)
    gone = [engine_id for engine_id, stored in found.items() if stored is None]
    if prune and gone:
        async with r.pipeline(transaction=False) as pipe:
            for engine_id in gone:
                pipe.eval(_PRUNE_LUA, 2, keys.engine(engine_id), keys.index, engine_id)
            await pipe.execute()
    return {engine_id: stored for engine_id, stored in found.items() if stored is not None}


async def last_event_id(r: aioredis.Redis, keys: Keys) -> str:
    """The newest stream entry id ("0-0" if none): read from here after a full read so
    that nothing announced in between is missed."""
    entries = await r.xrevrange(keys.events, count=1)
    return str(entries[0][0]) if entries else "0-0"


async def server_run_id(r: aioredis.Redis) -> str:
    info = await r.info("server")
    return str(info.get("run_id", ""))
