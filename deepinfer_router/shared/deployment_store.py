"""Deployments in Redis: the router's API writes desired state, agents claim replicas
with leases and write what they observe. One module, so both sides agree on keys and on
the atomic steps (Lua scripts: a claim is one SET NX, a renewal, status write or release
only takes effect while the caller still holds the claim).

Keys (under `{namespace}:`, beside the engine registry's):

- `{ns}:deployment:{id}`     JSON Deployment (spec, generation, slots, deleting)
- `{ns}:deployments`         set of deployment ids
- `{ns}:deployment-names`    hash served model name -> deployment id (one per name)
- `{ns}:claim:{id}:{i}`      agent id holding replica i; PEXPIRE'd to the lease
- `{ns}:replica:{id}:{i}`    JSON ReplicaStatus (no TTL: a Failed status must outlive
                             its claim); deleted with the replica
- `{ns}:host:{agent}`        JSON HostRecord, PEXPIRE'd to the agent's lease
- `{ns}:hosts`               set of agent ids (pruned when the record is gone)
- `{ns}:deployment-events`   stream of change notices (`id`, `op`); only a wake-up:
                             agents also reconcile periodically
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import orjson
import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import RedisError, WatchError

from .deployment import (
    Deployment,
    DeploymentConflict,
    DeploymentNotFound,
    DeploymentSpec,
    HostRecord,
    ReplicaStatus,
    deployment_id_for,
)

NOTICES_MAXLEN = 1000


@dataclass(frozen=True, slots=True)
class DeploymentKeys:
    namespace: str

    def deployment(self, dep_id: str) -> str:
        return f"{self.namespace}:deployment:{dep_id}"

    @property
    def deployments(self) -> str:
        return f"{self.namespace}:deployments"

    @property
    def names(self) -> str:
        return f"{self.namespace}:deployment-names"

    def claim(self, dep_id: str, index: int) -> str:
        return f"{self.namespace}:claim:{dep_id}:{index}"

    def replica(self, dep_id: str, index: int) -> str:
        return f"{self.namespace}:replica:{dep_id}:{index}"

    def host(self, agent_id: str) -> str:
        return f"{self.namespace}:host:{agent_id}"

    @property
    def hosts(self) -> str:
        return f"{self.namespace}:hosts"

    @property
    def notices(self) -> str:
        return f"{self.namespace}:deployment-events"


# KEYS[1] claim, KEYS[2] deployment; ARGV: agent, lease ms, replica index, deployment uid.
# Take (or keep) a replica only while its deployment still wants it: the same creation
# (uid), not deleting, index below replicas. Unclaimed: SET; ours: extend; else refuse.
_CLAIM_LUA = """
local raw = redis.call('GET', KEYS[2])
if not raw then return 0 end
local dep = cjson.decode(raw)
if dep['deleting'] or dep['uid'] ~= ARGV[4] then return 0 end
if tonumber(ARGV[3]) >= tonumber(dep['spec']['replicas']) then return 0 end
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
elseif holder then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# KEYS[1] claim; ARGV[1] agent, ARGV[2] lease ms. Renew only what is still ours.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS[1] claim, KEYS[2] status; ARGV[1] agent, ARGV[2] status JSON. Fenced write.
_STATUS_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[2], ARGV[2])
  return 1
end
return 0
"""
# KEYS[1] claim, KEYS[2] status; ARGV[1] agent, ARGV[2] "keep" | "delete" | status JSON.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
redis.call('DEL', KEYS[1])
if ARGV[2] == 'delete' then
  redis.call('DEL', KEYS[2])
elseif ARGV[2] ~= 'keep' then
  redis.call('SET', KEYS[2], ARGV[2])
end
return 1
"""
# KEYS: deployment, deployments set, names hash, then `slots` claim keys and `slots`
# status keys; ARGV: id, served name, slots. Removes a deleting deployment once no
# replica is claimed any more.
_FINALIZE_LUA = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 1 end
if not cjson.decode(raw)['deleting'] then return 0 end
local slots = tonumber(ARGV[3])
for i = 1, slots do
  if redis.call('EXISTS', KEYS[3 + i]) == 1 then return 0 end
end
for i = 1, slots do redis.call('DEL', KEYS[3 + slots + i]) end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
if redis.call('HGET', KEYS[3], ARGV[2]) == ARGV[1] then
  redis.call('HDEL', KEYS[3], ARGV[2])
end
return 1
"""


def _decode_deployment(raw: str | bytes | None) -> Deployment | None:
    if raw is None:
        return None
    try:
        data = orjson.loads(raw)
        # A newer router may store fields this side does not know: read what is known
        # rather than take the deployment for gone (and stop its replicas).
        if isinstance(data, dict) and isinstance(data.get("spec"), dict):
            known = DeploymentSpec.model_fields
            data["spec"] = {k: v for k, v in data["spec"].items() if k in known}
        return Deployment.model_validate(data)
    except (orjson.JSONDecodeError, ValidationError):
        return None


def _decode_status(raw: str | bytes | None) -> ReplicaStatus | None:
    if raw is None:
        return None
    try:
        return ReplicaStatus.model_validate_json(raw)
    except ValidationError:
        return None


class DeploymentStore:
    """Every deployment operation, on one Redis client (the caller owns the client)."""

    # What a call raises when Redis cannot be reached or fails (for callers that should
    # not import redis themselves).
    errors: tuple[type[Exception], ...] = (RedisError, OSError)

    def __init__(self, r: aioredis.Redis, namespace: str = "deepinfer") -> None:
        self.r = r
        self.keys = DeploymentKeys(namespace)

    # --- desired state (the API) -----------------------------------------------------

    async def create(self, spec: DeploymentSpec, now: float | None = None
                     ) -> tuple[Deployment, bool]:
        """(deployment, created). The same spec again returns the stored one; another
        spec for a served name already deployed raises DeploymentConflict."""
        now = time.time() if now is None else now
        served = spec.served_name
        dep_id = deployment_id_for(served)
        k = self.keys
        while True:
            async with self.r.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(k.names, k.deployment(dep_id))
                    existing_id = await pipe.hget(k.names, served)  # type: ignore[misc]
                    existing = _decode_deployment(await pipe.get(k.deployment(dep_id)))
                    if existing_id is not None or existing is not None:
                        if existing is None:  # a name entry without its deployment: stale
                            pipe.multi()
                            pipe.hdel(k.names, served)
                            await pipe.execute()
                            continue
                        if existing.deleting:
                            raise DeploymentConflict(
                                f"deployment {existing.id} of {served!r} is being deleted; "
                                "deploy again once it is gone")
                        diff = existing.spec.differences(spec)
                        if diff:
                            raise DeploymentConflict(
                                f"{served!r} is already deployed as {existing.id} with a "
                                f"different spec ({', '.join(diff)}); PATCH replicas to "
                                "scale, or delete it and deploy again")
                        return existing, False
                    dep = Deployment(id=dep_id, spec=spec, generation=1, slots=spec.replicas,
                                     created_at=now, updated_at=now)
                    pipe.multi()
                    pipe.set(k.deployment(dep_id), dep.model_dump_json())
                    pipe.sadd(k.deployments, dep_id)
                    pipe.hset(k.names, served, dep_id)
                    self._notice(pipe, dep_id, "created")
                    await pipe.execute()
                    return dep, True
                except WatchError:
                    continue

    async def get(self, dep_id: str) -> Deployment | None:
        return _decode_deployment(await self.r.get(self.keys.deployment(dep_id)))

    async def all(self) -> list[Deployment]:
        return (await self.read_all())[0]

    async def read_all(self) -> tuple[list[Deployment], set[str]]:
        """Every deployment, and the ids of any stored but unreadable (the agent leaves
        those replicas alone rather than take them for deleted)."""
        ids = sorted(map(str, await self.r.smembers(self.keys.deployments)))  # type: ignore[misc]
        if not ids:
            return [], set()
        raws = await self.r.mget([self.keys.deployment(i) for i in ids])
        found, unreadable = [], set()
        for dep_id, raw in zip(ids, raws, strict=True):
            dep = _decode_deployment(raw)
            if dep is not None:
                found.append(dep)
            elif raw is not None:
                unreadable.add(dep_id)
        return found, unreadable

    async def scale(self, dep_id: str, replicas: int, now: float | None = None) -> Deployment:
        def change(dep: Deployment) -> None:
            if dep.deleting:
                raise DeploymentConflict(f"deployment {dep_id} is being deleted")
            dep.spec = dep.spec.model_copy(update={"replicas": replicas})
            dep.slots = max(dep.slots, replicas)

        return await self._update(dep_id, change, now)

    async def delete(self, dep_id: str, now: float | None = None) -> Deployment:
        """Mark for deletion: agents drain and stop every replica, then the deployment
        goes (at once when no replica is claimed)."""
        def change(dep: Deployment) -> None:
            dep.deleting = True

        dep = await self._update(dep_id, change, now)
        await self.finalize(dep)
        return dep

    async def _update(self, dep_id: str, change: object, now: float | None) -> Deployment:
        now = time.time() if now is None else now
        key = self.keys.deployment(dep_id)
        while True:
            async with self.r.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(key)
                    dep = _decode_deployment(await pipe.get(key))
                    if dep is None:
                        raise DeploymentNotFound(dep_id)
                    change(dep)  # type: ignore[operator]
                    dep.generation += 1
                    dep.updated_at = now
                    pipe.multi()
                    pipe.set(key, dep.model_dump_json())
                    self._notice(pipe, dep_id, "changed")
                    await pipe.execute()
                    return dep
                except WatchError:
                    continue

    async def finalize(self, dep: Deployment) -> bool:
        """Remove a deleting deployment whose replicas are all released."""
        k = self.keys
        slots = max(dep.slots, dep.spec.replicas)
        keys = [k.deployment(dep.id), k.deployments, k.names,
                *(k.claim(dep.id, i) for i in range(slots)),
                *(k.replica(dep.id, i) for i in range(slots))]
        done = await self.r.eval(  # type: ignore[misc]
            _FINALIZE_LUA, len(keys), *keys, dep.id, dep.spec.served_name, slots)
        if done:
            await self.notify(dep.id, "deleted")
        return bool(done)

    def _notice(self, pipe: aioredis.client.Pipeline, dep_id: str, op: str) -> None:
        pipe.xadd(self.keys.notices, {"id": dep_id, "op": op}, maxlen=NOTICES_MAXLEN,
                  approximate=True)

    async def notify(self, dep_id: str, op: str) -> None:
        await self.r.xadd(self.keys.notices, {"id": dep_id, "op": op},
                          maxlen=NOTICES_MAXLEN, approximate=True)

    async def last_notice_id(self) -> str:
        entries = await self.r.xrevrange(self.keys.notices, count=1)
        return str(entries[0][0]) if entries else "0-0"

    async def wait_notice(self, after: str, timeout_s: float) -> str:
        """Block until a notice newer than `after` (or the timeout); the newest id seen."""
        got: Any = await self.r.xread({self.keys.notices: after},
                                      block=max(1, int(timeout_s * 1000)))
        for _stream, entries in got or []:
            if entries:
                after = str(entries[-1][0])
        return after

    # --- replicas (the agents) -------------------------------------------------------

    async def claims(self, dep: Deployment) -> list[str | None]:
        """Who holds each replica slot (None: nobody)."""
        slots = max(dep.slots, dep.spec.replicas)
        if not slots:
            return []
        raws = await self.r.mget([self.keys.claim(dep.id, i) for i in range(slots)])
        return [None if raw is None else str(raw) for raw in raws]

    async def statuses(self, dep: Deployment) -> list[ReplicaStatus | None]:
        slots = max(dep.slots, dep.spec.replicas)
        if not slots:
            return []
        raws = await self.r.mget([self.keys.replica(dep.id, i) for i in range(slots)])
        return [_decode_status(raw) for raw in raws]

    async def claim(self, dep: Deployment, index: int, agent: str, lease_s: float) -> bool:
        """Take an unclaimed replica (or extend our own claim: adoption), atomically and
        only while `dep` (this creation of it) still wants replica `index`: two agents
        never both win, and a replica deleted or scaled away meanwhile is not taken."""
        k = self.keys
        ok = await self.r.eval(  # type: ignore[misc]
            _CLAIM_LUA, 2, k.claim(dep.id, index), k.deployment(dep.id), agent,
            _ms(lease_s), index, dep.uid)
        return bool(ok)

    async def renew(self, held: list[tuple[str, int]], agent: str, lease_s: float
                    ) -> list[tuple[str, int]]:
        """Extend every claim still ours; returns the ones lost (expired or taken)."""
        if not held:
            return []
        async with self.r.pipeline(transaction=False) as pipe:
            for dep_id, index in held:
                pipe.eval(_RENEW_LUA, 1, self.keys.claim(dep_id, index), agent, _ms(lease_s))
            res = await pipe.execute()
        return [h for h, ok in zip(held, res, strict=True) if not ok]

    async def write_status(self, status: ReplicaStatus, agent: str) -> bool:
        """Write a replica's status while `agent` holds its claim (False: it does not)."""
        k = self.keys
        ok = await self.r.eval(  # type: ignore[misc]
            _STATUS_LUA, 2, k.claim(status.deployment, status.index),
            k.replica(status.deployment, status.index), agent, status.model_dump_json())
        return bool(ok)

    async def release(self, dep_id: str, index: int, agent: str,
                      status: ReplicaStatus | None = None, *, delete_status: bool = False
                      ) -> bool:
        """Give a claim up (if still ours), leaving `status` behind, or deleting it."""
        k = self.keys
        what = "delete" if delete_status else (status.model_dump_json() if status else "keep")
        ok = await self.r.eval(  # type: ignore[misc]
            _RELEASE_LUA, 2, k.claim(dep_id, index), k.replica(dep_id, index), agent, what)
        if ok:
            await self.notify(dep_id, "released")
        return bool(ok)

    # --- hosts ---------------------------------------------------------------------

    async def write_host(self, host: HostRecord, ttl_s: float) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.set(self.keys.host(host.id), host.model_dump_json(), px=_ms(ttl_s))
            pipe.sadd(self.keys.hosts, host.id)
            await pipe.execute()

    async def delete_host(self, agent_id: str) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(self.keys.host(agent_id))
            pipe.srem(self.keys.hosts, agent_id)
            await pipe.execute()

    async def hosts(self) -> list[HostRecord]:
        ids = sorted(map(str, await self.r.smembers(self.keys.hosts)))  # type: ignore[misc]
        if not ids:
            return []
        raws = await self.r.mget([self.keys.host(i) for i in ids])
        out, gone = [], []
        for agent_id, raw in zip(ids, raws, strict=True):
            try:
                out.append(HostRecord.model_validate_json(raw)) if raw else gone.append(agent_id)
            except ValidationError:
                gone.append(agent_id)
        if gone:
            await self.r.srem(self.keys.hosts, *gone)  # type: ignore[misc]
        return out


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
