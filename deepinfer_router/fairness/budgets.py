"""Per-tenant budgets: concurrent requests, requests per minute, tokens per minute (pure:
time is an argument).

Per minute limits are token buckets, as OpenAI's limits behave: a bucket holds at most
the limit and refills at limit/60 per second, so a tenant may burst up to its limit and
then goes on at its rate. A request takes 1 from the requests bucket and its estimated
tokens (prompt + expected output) from the tokens bucket, all or nothing; when it ends,
the tokens bucket gets back what the estimate overstated, or pays what it understated
(the level may go below zero: the next requests wait for it). A request of more tokens
than the whole limit is let through once the bucket is full (taking it into debt), so it
is delayed, never refused for ever.

Each admitted request holds a place under an id until it ends or its expiry passes (a
request that never reports its end, because the process that ran it died, frees its
place when it would have timed out anyway). Ending a request is idempotent: an id not
held (ended already, never admitted here, or held by a process that restarted) changes
nothing, so a caller that cannot tell whether its admission or its end got through can
safely say it again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from .tenants import TenantLimits

PER_MINUTE_S = 60.0
_PRUNE_AT = 1024  # running ids kept before expired ones are looked for (no concurrency limit)
LIMIT_WORDS = {
    "max_concurrency": "concurrent requests",
    "requests_per_minute": "requests per minute",
    "tokens_per_minute": "tokens per minute",
}


@dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is over its tenant's budget, and when to try again."""

    limit: str  # a key of LIMIT_WORDS
    value: int  # the limit
    retry_after_s: float


@dataclass(slots=True)
class Bucket:
    capacity: float
    level: float
    at: float

    def refill(self, now: float) -> float:
        if now > self.at:
            self.level = min(self.capacity,
                             self.level + (now - self.at) * self.capacity / PER_MINUTE_S)
            self.at = now
        return self.level

    def wait_for(self, amount: float) -> float:
        """Seconds until `amount` (at most the capacity) can be taken (after refill)."""
        need = min(amount, self.capacity) - self.level
        return max(need, 0.0) * PER_MINUTE_S / self.capacity

    def until_full(self) -> float:
        return (self.capacity - self.level) * PER_MINUTE_S / self.capacity


@dataclass(frozen=True, slots=True)
class Headroom:
    """What is left of a tenant's per-minute budgets (for x-ratelimit-* headers)."""

    requests: tuple[int, int, float] | None = None  # (limit, remaining, seconds to full)
    tokens: tuple[int, int, float] | None = None


@dataclass(slots=True)
class _Tenant:
    limits: TenantLimits
    requests: Bucket | None
    tokens: Bucket | None
    running: dict[str, float] = field(default_factory=dict)  # request id -> expiry

    def prune(self, now: float) -> None:
        for rid in [rid for rid, until in self.running.items() if until <= now]:
            del self.running[rid]


@dataclass(slots=True)
class Budgets:
    """The budgets of every tenant that has some."""

    limits: Mapping[str, TenantLimits]
    _tenants: dict[str, _Tenant] = field(default_factory=dict)

    def limited(self, tenant: str) -> bool:
        return tenant in self.limits

    def _tenant(self, tenant: str, now: float) -> _Tenant:
        t = self._tenants.get(tenant)
        if t is None:
            limits = self.limits[tenant]
            rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
            t = self._tenants[tenant] = _Tenant(
                limits, Bucket(rpm, rpm, now) if rpm else None,
                Bucket(tpm, tpm, now) if tpm else None)
        return t

    def admit(self, tenant: str, tokens: int, now: float, rid: str,
              expires_at: float = math.inf) -> Refusal | None:
        """Take a place in `tenant`'s budgets for request `rid` estimated at `tokens`
        (held until `finish(rid)` or `expires_at`), or say which limit it is over
        (nothing is taken then)."""
        if tenant not in self.limits:
            return None
        t = self._tenant(tenant, now)
        limits = t.limits
        if len(t.running) >= (limits.max_concurrency or _PRUNE_AT):
            t.prune(now)  # (ends never told: places past their expiry)
            if limits.max_concurrency is not None and len(
                    t.running) >= limits.max_concurrency:
                # no rate to wait for: a running request ends when it ends
                return Refusal("max_concurrency", limits.max_concurrency, 1.0)
        if t.requests is not None:
            t.requests.refill(now)
            if t.requests.level < 1:
                return Refusal("requests_per_minute", int(t.requests.capacity),
                               t.requests.wait_for(1))
        if t.tokens is not None:
            t.tokens.refill(now)
            if t.tokens.level < min(tokens, t.tokens.capacity):
                return Refusal("tokens_per_minute", int(t.tokens.capacity),
                               t.tokens.wait_for(tokens))
        t.running[rid] = expires_at
        if t.requests is not None:
            t.requests.level -= 1
        if t.tokens is not None:
            t.tokens.level -= tokens
        return None

    def finish(self, tenant: str, rid: str, charged: int, used: int | None,
               now: float) -> bool:
        """Request `rid`, admitted with `charged` tokens, ended; it used `used` (None:
        its answer did not say, the estimate stands). False when `rid` held no place
        here (nothing changes)."""
        t = self._tenants.get(tenant)
        if t is None or t.running.pop(rid, None) is None:
            return False
        if t.tokens is not None and used is not None:
            t.tokens.refill(now)
            t.tokens.level = min(t.tokens.capacity, t.tokens.level + charged - used)
        if not t.running and self._idle(t, now):
            del self._tenants[tenant]  # full again: nothing to remember
        return True

    def headroom(self, tenant: str, now: float) -> Headroom:
        t = self._tenants.get(tenant)
        if t is None:
            limits = self.limits.get(tenant)
            if limits is None:
                return Headroom()
            t = self._tenant(tenant, now)
        return Headroom(_room(t.requests, now), _room(t.tokens, now))

    @staticmethod
    def _idle(t: _Tenant, now: float) -> bool:
        return all(b is None or b.refill(now) >= b.capacity for b in (t.requests, t.tokens))


def _room(bucket: Bucket | None, now: float) -> tuple[int, int, float] | None:
    if bucket is None:
        return None
    level = bucket.refill(now)
    return int(bucket.capacity), max(math.floor(level), 0), bucket.until_full()


def duration(seconds: float) -> str:
    """OpenAI's x-ratelimit-reset-* format: `20ms`, `1.5s`, `6m0s`."""
    if seconds < 1:
        return f"{max(math.ceil(seconds * 1000), 0)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 10) / 10:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


def ratelimit_headers(room: Headroom) -> dict[str, str]:
    """x-ratelimit-{limit,remaining,reset}-{requests,tokens}, as OpenAI sends them."""
    out: dict[str, str] = {}
    for kind, value in (("requests", room.requests), ("tokens", room.tokens)):
        if value is not None:
            limit, remaining, reset = value
            out[f"x-ratelimit-limit-{kind}"] = str(limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(remaining)
            out[f"x-ratelimit-reset-{kind}"] = duration(reset)
    return out


def refusal_message(tenant: str, refusal: Refusal) -> str:
    words = LIMIT_WORDS[refusal.limit]
    return (f"Rate limit reached for tenant {tenant}: {words} (limit {refusal.value}). "
            f"Retry after {duration(refusal.retry_after_s)}.")
