"""Budgets across --workers without Redis: each tenant's budgets live in one worker (its
owner, by a hash of the name) and the others ask it over the workers' private sockets
(one round trip of about 0.2 ms per request of a tenant with budgets; none for the rest).
So the limits hold for the router as a whole. Every request has an id, and ending it is
idempotent at the owner, so an admission whose answer came too late is undone by ending
its id, and an end said twice counts once. While the owner cannot be reached (it is
restarting, or slower than 1 s), a worker admits on its own, within 1/N of each limit; a
restarted owner starts its tenants' budgets afresh (full buckets, no requests counted
running), as a restarted router does."""

from __future__ import annotations

import functools
import itertools
import logging
import os
import zlib
from collections.abc import Mapping
from typing import Any

import orjson
from aiohttp import web

from ..errors import error_response
from ..fairness.budgets import Headroom, Refusal
from ..fairness.tenants import TenantLimits
from ..state import STATE
from ..workers.siblings import Siblings, via_sibling
from .ends import Ends
from .gate import LocalGate, Verdict, share

log = logging.getLogger("deepinfer.budgets")

BUDGET_PATH = "/internal/budget"
_ASK_TIMEOUT_S = 1.0


def owner_of(tenant: str, count: int) -> int:
    return zlib.crc32(tenant.encode()) % count


class OwnerGate:
    def __init__(self, limits: Mapping[str, TenantLimits], siblings: Siblings,
                 hold_s: float = 3600.0) -> None:
        self._siblings = siblings
        self._index = siblings.slot.index
        self._count = siblings.slot.count
        # the budgets of the tenants this worker owns
        self.owned = LocalGate(limits, hold_s)
        self._alone = LocalGate({t: share(lim, self._count) for t, lim in limits.items()},
                                hold_s)
        self._ids = itertools.count()
        self._prefix = f"w{self._index}-{os.urandom(4).hex()}-"  # unique across restarts
        self._ends_by_owner: dict[int, Ends] = {}

    def limited(self, tenant: str) -> bool:
        return self.owned.limited(tenant)

    async def admit(self, tenant: str, tokens: int) -> Verdict:
        owner = owner_of(tenant, self._count)
        rid = self._prefix + str(next(self._ids))
        if owner == self._index:
            return self.owned.admit_now(tenant, tokens, rid)
        ends = self._ends(owner)
        answer = await ends.admission(
            self._ask(owner, {"op": "admit", "tenant": tenant, "tokens": tokens, "id": rid}),
            tenant, rid, tokens)
        if answer is None:  # (undone there, in case it answered late): admit here alone
            return self._alone.admit_now(tenant, tokens, rid)
        refusal, room = answer
        if refusal is not None:
            return Verdict(refusal, room)
        return Verdict(None, room, lambda used: ends.finish(tenant, rid, tokens, used))

    def _ends(self, owner: int) -> Ends:
        ends = self._ends_by_owner.get(owner)
        if ends is None:
            ends = self._ends_by_owner[owner] = Ends(functools.partial(self._tell_finish,
                                                                       owner))
        return ends

    async def _tell_finish(self, owner: int, tenant: str, rid: str, tokens: int,
                           used: int | None) -> bool:
        body = {"op": "finish", "tenant": tenant, "id": rid, "tokens": tokens, "used": used}
        answer = await self._siblings.call_one(
            owner, "POST", BUDGET_PATH, orjson.dumps(body), _ASK_TIMEOUT_S)
        return answer is not None

    async def _ask(self, owner: int, body: dict[str, Any]
                   ) -> tuple[Refusal | None, Headroom] | None:
        answer = await self._siblings.call_one(owner, "POST", BUDGET_PATH, orjson.dumps(body),
                                               _ASK_TIMEOUT_S)
        if answer is None or answer[0] != 200:
            return None
        try:
            data = orjson.loads(answer[1])
            refusal = Refusal(*data["refusal"]) if data["refusal"] else None
            room = Headroom(*(tuple(r) if r else None for r in data["room"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            return None
        return refusal, room

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        for ends in self._ends_by_owner.values():  # ends on their way out
            await ends.close(_ASK_TIMEOUT_S)


async def receive_budget(request: web.Request) -> web.Response:
    """A sibling asks about a tenant this worker owns (only over the private socket)."""
    if not via_sibling(request):
        return error_response(404, f"No route {request.path[:200]}.", "not_found")
    gate = request.app[STATE].budgets
    try:
        body = orjson.loads(await request.read())
        op, tenant, rid = body["op"], body["tenant"], body["id"]
        tokens = int(body["tokens"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return error_response(400, "Malformed budget request.", "invalid_body")
    if not isinstance(gate, OwnerGate) or not isinstance(tenant, str) or not isinstance(
            rid, str) or not gate.limited(tenant):
        return error_response(404, "No budget for this tenant here.", "not_found")
    if op == "finish":
        used = body.get("used")
        gate.owned.finish_now(tenant, rid, tokens, used if isinstance(used, int) else None)
        return web.json_response({})
    verdict = gate.owned.admit_now(tenant, tokens, rid)
    refusal = verdict.refusal
    return web.Response(body=orjson.dumps({
        "refusal": [refusal.limit, refusal.value, refusal.retry_after_s] if refusal else None,
        "room": [verdict.room.requests, verdict.room.tokens]}), content_type="application/json")
