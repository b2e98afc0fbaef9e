"""The budget gate the proxy asks before admitting a tenant's request, and the one that
keeps the budgets in this process."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol

from ..fairness.budgets import Budgets, Headroom, Refusal
from ..fairness.tenants import TenantLimits

# What an admitted request calls when it ends, with the tokens its answer reported
# (None: not reported, the estimate stands).
Finish = Callable[[int | None], None]


def _nothing(_used: int | None) -> None:
    return None


@dataclass(frozen=True, slots=True)
class Verdict:
    refusal: Refusal | None  # None: admitted
    room: Headroom  # what is left, for the x-ratelimit-* headers
    finish: Finish = _nothing  # call once when an admitted request ends


class BudgetGate(Protocol):
    def limited(self, tenant: str) -> bool: ...

    async def admit(self, tenant: str, tokens: int) -> Verdict:
        """Take a place in `tenant`'s budgets for a request estimated at `tokens`, or
        the limit it is over."""
        ...

    async def start(self) -> None: ...

    async def close(self) -> None: ...


class LocalGate:
    """Budgets kept in this process: exact for a router of one worker. A place is held
    at most `hold_s` (a request that has not ended by then has timed out)."""

    def __init__(self, limits: Mapping[str, TenantLimits], hold_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.budgets = Budgets(limits)
        self._hold_s = hold_s
        self._clock = clock
        self._ids = itertools.count()

    def limited(self, tenant: str) -> bool:
        return self.budgets.limited(tenant)

    def admit_now(self, tenant: str, tokens: int, rid: str | None = None) -> Verdict:
        now = self._clock()
        rid = rid if rid is not None else str(next(self._ids))
        refusal = self.budgets.admit(tenant, tokens, now, rid, now + self._hold_s)
        room = self.budgets.headroom(tenant, now)
        if refusal is not None:
            return Verdict(refusal, room)

        def finish(used: int | None) -> None:
            self.finish_now(tenant, rid, tokens, used)

        return Verdict(None, room, finish)

    def finish_now(self, tenant: str, rid: str, charged: int, used: int | None) -> None:
        self.budgets.finish(tenant, rid, charged, used, self._clock())

    async def admit(self, tenant: str, tokens: int) -> Verdict:
        return self.admit_now(tenant, tokens)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None


def share(limits: TenantLimits, count: int) -> TenantLimits:
    """One of `count` equal shares of `limits` (at least 1 each): what a router part
    admits alone while the place the budgets are kept cannot be reached."""
    def part(value: int | None) -> int | None:
        return None if value is None else max(value // count, 1)

    return TenantLimits(part(limits.max_concurrency), part(limits.requests_per_minute),
                        part(limits.tokens_per_minute))
