"""The channel between a router's workers: each worker also serves the router's app on a
private Unix socket (in a 0700 directory the supervisor made), and reaches its siblings
there. A sibling that is restarting is skipped: it starts from the engines' registry and
the next placements, as a new router does.

What crosses it:
- placements (the kv-aware policy's hints: prefix chains, session bindings), every
  `interval_s`, so that a conversation's next turn finds its engine whichever worker the
  kernel hands the connection to (`SiblingHints`);
- admin writes (register, delete, drain an engine): done where they arrive, then
  replayed on every sibling before the answer (`replicate_writes`);
- reads that one worker cannot answer alone: `/metrics` (every worker's counters added
  up, `gather_metrics`) and a decision another worker made (`ask_siblings_on_404`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from ..errors import RouterError
from ..periodic import Periodic
from ..routing.base import EngineLookup
from ..state import STATE
from .metrics_merge import merge
from .slot import WorkerSlot

log = logging.getLogger("deepinfer.workers")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

HINTS_PATH = "/internal/worker-hints"
# Headers a replayed request keeps: what the handlers and the admin check read.
_FORWARDED = ("Authorization", "Content-Type", "Host", "X-Admin-Key", "Origin",
              "Sec-Fetch-Site", "User-Agent")
_TIMEOUT = aiohttp.ClientTimeout(total=5.0, connect=1.0)
MAX_HINT_BATCH = 1024


def via_sibling(request: web.Request) -> bool:
    """The request came over a worker's private Unix socket (from a sibling)."""
    transport = request.transport
    return transport is not None and isinstance(transport.get_extra_info("sockname"), str)


class Siblings:
    """Clients for every other worker's Unix socket."""

    def __init__(self, slot: WorkerSlot) -> None:
        self.slot = slot
        self._sessions: list[aiohttp.ClientSession] = []

    async def start(self) -> None:
        self._sessions = [
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path)),
                                  timeout=_TIMEOUT)
            for path in self.slot.sibling_sockets
        ]

    async def close(self) -> None:
        for session in self._sessions:
            await session.close()
        self._sessions = []

    async def _one(self, session: aiohttp.ClientSession, method: str, path: str,
                   body: bytes | None, headers: dict[str, str]) -> tuple[int, bytes] | None:
        try:
            async with session.request(method, "http://worker" + path, data=body,
                                       headers=headers) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            # restarting (no socket yet) or gone: it catches up from the registry
            log.debug("sibling %s %s: %s", method, path, exc)
            return None

    async def call(self, method: str, path: str, body: bytes | None = None,
                   headers: dict[str, str] | None = None) -> list[tuple[int, bytes]]:
        """The same request to every sibling at once; the answers of those that gave one."""
        answers = await asyncio.gather(
            *(self._one(s, method, path, body, headers or {}) for s in self._sessions))
        return [a for a in answers if a is not None]


SIBLINGS: web.AppKey[Siblings] = web.AppKey("deepinfer_siblings", Siblings)
WORKER_SLOT: web.AppKey[WorkerSlot] = web.AppKey("deepinfer_worker_slot", WorkerSlot)


def forwarded_headers(request: web.Request) -> dict[str, str]:
    return {k: v for k in _FORWARDED if (v := request.headers.get(k)) is not None}


def replicate_writes(siblings: Siblings, handler: Handler) -> Handler:
    """An admin write, done here and then on every sibling (admin writes reach every
    worker before the client hears back)."""

    async def replicated(request: web.Request) -> web.StreamResponse:
        response = await handler(request)
        if response.status < 400 and not via_sibling(request):
            await siblings.call(request.method, request.path_qs, await request.read(),
                                forwarded_headers(request))
        return response

    return replicated


def gather_metrics(siblings: Siblings, handler: Handler) -> Handler:
    """/metrics for the whole router: this worker's exposition merged with its siblings'."""

    async def gathered(request: web.Request) -> web.StreamResponse:
        response = await handler(request)
        if via_sibling(request) or not isinstance(response, web.Response):
            return response
        answers = await siblings.call("GET", request.path_qs,
                                      headers=forwarded_headers(request))
        own = bytes(response.body) if isinstance(response.body, bytes | bytearray) else b""
        others = [body.decode() for status, body in answers if status == 200]
        body = await asyncio.to_thread(merge, own.decode(), others)  # parsing: off the loop
        return web.Response(body=body, headers={"Content-Type": response.content_type
                                                + "; version=0.0.4; charset=utf-8"})

    return gathered


def ask_siblings_on_404(siblings: Siblings, handler: Handler) -> Handler:
    """A read of something another worker holds (a decision it made)."""

    async def asked(request: web.Request) -> web.StreamResponse:
        response = await handler(request)
        if response.status != 404 or via_sibling(request):
            return response
        answers = await siblings.call("GET", request.path_qs,
                                      headers=forwarded_headers(request))
        for status, body in answers:
            if status == 200:
                return web.Response(body=body, content_type="application/json")
        return response

    return asked


async def receive_hints(request: web.Request) -> web.Response:
    """A sibling's placements (only over the private socket: from TCP it does not exist)."""
    if not via_sibling(request):
        raise RouterError(404, f"No route {request.path}.", "not_found")
    state = request.app[STATE]
    try:
        hints = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        raise RouterError(400, "Malformed hint batch.", "invalid_json") from None
    if isinstance(hints, list):
        state.policy.import_hints((h for h in hints if isinstance(h, dict)),
                                  time.monotonic(), fleet_lookup(request.app))
    return web.Response(status=204)


def fleet_lookup(app: web.Application) -> EngineLookup:
    fleet = app[STATE].fleet

    def lookup(engine_id: str) -> tuple[str, int] | None:
        engine = fleet.engines.get(engine_id)
        if engine is None:
            return None
        return engine.record.instance, fleet.kv_capacity_chars(engine)

    return lookup


class SiblingHints(Periodic):
    """Sends this worker's new placements to every sibling every `interval_s` (the
    request path only appends them to the policy's outbox)."""

    def __init__(self, siblings: Siblings, export: Callable[[int], list[dict[str, Any]]],
                 interval_s: float = 0.02) -> None:
        super().__init__(interval_s, "worker-hints")
        self._siblings = siblings
        self._export = export
        self.sent = 0

    async def run_once(self) -> None:
        hints = self._export(MAX_HINT_BATCH)
        if hints:
            await self._siblings.call("POST", HINTS_PATH, orjson.dumps(hints),
                                      {"Content-Type": "application/json"})
            self.sent += len(hints)
