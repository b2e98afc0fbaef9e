"""Budgets in Redis (--redis-url): every router sharing it, and all their workers, take
from the same buckets, so a tenant's limits hold across the fleet. One script call per
request of a tenant with budgets, atomic in Redis, timed by Redis's own clock (the
routers' clocks do not matter); one more when it ends.

Keys, under `{ns}:budget:{tenant}` (a hash tag, so a cluster keeps a tenant's keys on
one node): `:running` a sorted set of the requests running, by id (scored by when they
expire: a router that dies frees its places within --request-timeout-s; an end is
settled once, whoever says it again), `:rpm` and `:tpm` the
buckets (hashes `level`, `at`; expiring once full again).

Accuracy: exact while Redis answers. While it does not (down, or slower than 0.25 s),
each router part admits on its own within its share of each limit (one worker's share
of the whole limit: with R routers sharing Redis, up to R times the limit in all), logs
a warning once, and tries Redis again a second later (so a Redis that hangs costs one
0.25 s wait a second, not one per request). An admission whose answer came too late is
undone (its id removed; a no-op if it never happened).
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Mapping

from ..fairness.budgets import Headroom, Refusal
from ..fairness.tenants import TenantLimits
from ..shared.redis_store import connect
from .ends import Ends
from .gate import LocalGate, Verdict, share

log = logging.getLogger("deepinfer.budgets")

_TIMEOUT_S = 0.25
_RETRY_S = 1.0

# ARGV: max_concurrency, rpm, tpm (0: none), tokens, request id, expiry in seconds.
# Returns {refused limit or '', limit, retry after s, requests level, tokens level} (the
# levels after this admission, or as they are when refused; -1: no such limit); numbers
# as strings (Redis would truncate Lua numbers to integers).
_ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local conc, rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, ttl = tonumber(ARGV[4]), tonumber(ARGV[6])
local function level(key, cap)
  local v = redis.call('HMGET', key, 'level', 'at')
  local lv, at = tonumber(v[1]), tonumber(v[2])
  if lv == nil or at == nil then return cap end
  if now > at then lv = math.min(cap, lv + (now - at) * cap / 60) end
  return lv
end
local rl, tl = -1, -1
if rpm > 0 then rl = level(KEYS[2], rpm) end
if tpm > 0 then tl = level(KEYS[3], tpm) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if conc > 0 then
  if redis.call('ZCARD', KEYS[1]) >= conc then
    return {'max_concurrency', tostring(conc), '1', tostring(rl), tostring(tl)}
  end
end
if rpm > 0 and rl < 1 then
  return {'requests_per_minute', tostring(rpm), tostring((1 - rl) * 60 / rpm), tostring(rl),
          tostring(tl)}
end
if tpm > 0 then
  local need = math.min(tokens, tpm)
  if tl < need then
    return {'tokens_per_minute', tostring(tpm), tostring((need - tl) * 60 / tpm),
            tostring(rl), tostring(tl)}
  end
end
-- every admitted request is held under its id (so that its end counts once)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[5])
redis.call('PEXPIRE', KEYS[1], math.ceil(ttl * 1000))
if rpm > 0 then
  rl = rl - 1
  redis.call('HSET', KEYS[2], 'level', tostring(rl), 'at', tostring(now))
  redis.call('PEXPIRE', KEYS[2], math.ceil((rpm - rl) * 60000 / rpm) + 1000)
end
if tpm > 0 then
  tl = tl - tokens
  redis.call('HSET', KEYS[3], 'level', tostring(tl), 'at', tostring(now))
  redis.call('PEXPIRE', KEYS[3], math.ceil((tpm - tl) * 60000 / tpm) + 1000)
end
return {'', '', '', tostring(rl), tostring(tl)}
"""

# ARGV: request id, tpm (0: none), tokens charged, tokens used (-1: not reported).
_FINISH_LUA = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  return 0  -- ended already, never admitted, or expired: nothing to settle
end
local tpm, charged, used = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if tpm > 0 and used >= 0 and used ~= charged then
  local v = redis.call('HMGET', KEYS[2], 'level', 'at')
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
  -- a key that expired was full again: an underestimate is still paid
  local lv, at = tonumber(v[1]) or tpm, tonumber(v[2]) or now
  if now > at then lv = math.min(tpm, lv + (now - at) * tpm / 60) end
  lv = math.min(tpm, lv + charged - used)
  if lv < tpm then
    redis.call('HSET', KEYS[2], 'level', tostring(lv), 'at', tostring(now))
    redis.call('PEXPIRE', KEYS[2], math.ceil((tpm - lv) * 60000 / tpm) + 1000)
  else
    redis.call('DEL', KEYS[2])
  end
end
return 0
"""


class RedisGate:
    def __init__(self, url: str, namespace: str, limits: Mapping[str, TenantLimits],
                 request_timeout_s: float = 600.0, parts: int = 1) -> None:
        self._url = url
        self._ns = namespace
        self._limits = dict(limits)
        self._expiry_s = request_timeout_s + 5.0
        # while Redis does not answer: this part's share of each limit
        self._alone = LocalGate({t: share(lim, parts) for t, lim in limits.items()},
                                self._expiry_s)
        self._ids = itertools.count()
        self._prefix = os.urandom(6).hex()  # request ids unique across routers
        self._ends = Ends(self._tell_finish)
        self._down = False
        self._retry_at = 0.0  # while down: when to try Redis again
        self._r = connect(url, socket_timeout=_TIMEOUT_S)
        # EVALSHA, loading the script again after a Redis restart (redis-py's Script)
        self._admit_script = self._r.register_script(_ADMIT_LUA)
        self._finish_script = self._r.register_script(_FINISH_LUA)

    def limited(self, tenant: str) -> bool:
        return tenant in self._limits

    def _keys(self, tenant: str) -> list[str]:
        base = f"{self._ns}:budget:{{{tenant}}}"
        return [base + ":running", base + ":rpm", base + ":tpm"]

    async def admit(self, tenant: str, tokens: int) -> Verdict:
        limits = self._limits[tenant]
        rid = f"{self._prefix}-{next(self._ids)}"
        if self._down and time.monotonic() < self._retry_at:
            return self._alone.admit_now(tenant, tokens, rid)
        keys = self._keys(tenant)
        answer = await self._ends.admission(
            self._admit_script(keys=keys, args=[
                limits.max_concurrency or 0, limits.requests_per_minute or 0,
                limits.tokens_per_minute or 0, tokens, rid, self._expiry_s]),
            tenant, rid, tokens, _TIMEOUT_S, self._went_down)
        if answer is None:  # down, slow, refused (undone there): admit alone
            return self._alone.admit_now(tenant, tokens, rid)
        if self._down:
            self._down = False
            log.warning("budgets: Redis answers again; tenants' budgets are shared again")
        refused, limit, retry, requests, tokens_left = answer
        room = self._room(limits, float(requests), float(tokens_left))
        if refused:
            return Verdict(Refusal(refused, int(limit), float(retry)), room)
        return Verdict(None, room, lambda used: self._ends.finish(tenant, rid, tokens, used))

    @staticmethod
    def _room(limits: TenantLimits, requests: float | None, tokens: float | None
              ) -> Headroom:
        def one(cap: int | None, level: float | None) -> tuple[int, int, float] | None:
            if cap is None or level is None:
                return None
            return cap, max(math.floor(level), 0), (cap - level) * 60 / cap

        return Headroom(one(limits.requests_per_minute, requests),
                        one(limits.tokens_per_minute, tokens))

    def _went_down(self, exc: BaseException) -> None:
        self._retry_at = time.monotonic() + _RETRY_S
        if not self._down:
            self._down = True
            log.warning("budgets: Redis does not answer (%s); each router part admits "
                        "alone within its share of each limit until it does",
                        type(exc).__name__)

    async def _tell_finish(self, tenant: str, rid: str, tokens: int,
                           used: int | None) -> bool:
        keys = self._keys(tenant)
        tpm = self._limits[tenant].tokens_per_minute or 0
        try:
            await self._finish_script(keys=[keys[0], keys[2]], args=[
                rid, tpm, tokens, -1 if used is None else used])
        except Exception as exc:  # retried by Ends; else the place expires
            self._went_down(exc)
            return False
        return True

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        await self._ends.close()
        await self._r.aclose()
