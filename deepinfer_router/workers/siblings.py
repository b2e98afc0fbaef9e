"""The channel between a router's workers: each worker also serves the router's app on a
private Unix socket (in a 0700 directory the supervisor made), and reaches its siblings
there. A sibling that is restarting is skipped: it starts from the engines' registry and
the next placements, as a new router does.

What crosses it:
- placements (the kv-aware policy's hints: prefix chains, session bindings) and the
  requests in flight per engine, every 20 ms, so that a conversation's next turn finds
  its engine whichever worker the kernel hands the connection to, and the load terms
  count the whole router's requests (`SiblingSync`);
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
from yarl import URL

from ..errors import error_response
from ..fleet import Fleet
from ..periodic import Periodic
from ..routing.base import EngineLookup
from ..shared.engine_record import EngineRecord
from ..state import STATE
from .metrics_merge import merge
from .slot import WorkerSlot

log = logging.getLogger("deepinfer.workers")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

SYNC_PATH = "/internal/worker-sync"
STATE_PATH = "/internal/worker-state"
HEARTBEAT_S = 0.25  # in-flight counts are re-sent at least this often
SILENT_S = 1.0  # a sibling not heard from for this long counts no requests in flight
# Headers a replayed request keeps: what the handlers and the admin check read.
_FORWARDED = ("Authorization", "Content-Type", "Host", "X-Admin-Key", "Origin",
              "Sec-Fetch-Site", "User-Agent")
_TIMEOUT = aiohttp.ClientTimeout(total=5.0, connect=1.0)
_SYNC_TIMEOUT_S = 0.5  # news older than this is stale anyway
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
        # per sibling: when it last told, and its requests in flight per engine
        self._inflight: dict[int, tuple[float, dict[str, int]]] = {}
        # per sibling (in sibling order): its last /metrics exposition
        self.last_metrics: list[str | None] = [None] * len(slot.sibling_sockets)

    def heard(self, index: int, counts: dict[str, int], now: float) -> None:
        self._inflight[index] = (now, counts)

    def inflight(self, now: float, max_age_s: float) -> dict[str, int]:
        """The siblings' requests in flight per engine, summed; a sibling silent for
        `max_age_s` (dead, restarting) counts for nothing."""
        total: dict[str, int] = {}
        for index, (at, counts) in list(self._inflight.items()):
            if now - at > max_age_s:
                del self._inflight[index]
                continue
            for engine_id, n in counts.items():
                total[engine_id] = total.get(engine_id, 0) + n
        return total

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
                   body: bytes | None, headers: dict[str, str], timeout_s: float
                   ) -> tuple[int, bytes] | None:
        try:
            async with session.request(
                    method, URL("http://worker" + path, encoded=True), data=body,
                    headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError, RuntimeError) as exc:
            # RuntimeError: the session closed under it (this worker is stopping)
            # restarting (no socket yet) or gone: it catches up from the registry
            log.debug("sibling %s %s: %s", method, path, exc)
            return None

    async def call(self, method: str, path: str, body: bytes | None = None,
                   headers: dict[str, str] | None = None, timeout_s: float = 2.0
                   ) -> list[tuple[int, bytes]]:
        """The same request to every sibling at once; the answers of those that gave one
        within `timeout_s` (a stuck sibling delays a call by that much, no more)."""
        answers = await asyncio.gather(
            *(self._one(s, method, path, body, headers or {}, timeout_s)
              for s in self._sessions))
        return [a for a in answers if a is not None]

    async def call_one(self, index: int, method: str, path: str, body: bytes | None,
                       timeout_s: float) -> tuple[int, bytes] | None:
        """One request to worker `index` (not this one); None when it does not answer."""
        session = self._sessions[index if index < self.slot.index else index - 1]
        return await self._one(session, method, path, body, {}, timeout_s)

    async def call_each(self, method: str, path: str, headers: dict[str, str] | None = None,
                        timeout_s: float = 2.0) -> list[tuple[int, bytes] | None]:
        """As `call`, one answer (or None) per sibling, in sibling order."""
        return list(await asyncio.gather(
            *(self._one(s, method, path, None, headers or {}, timeout_s)
              for s in self._sessions)))


SIBLINGS: web.AppKey[Siblings] = web.AppKey("deepinfer_siblings", Siblings)
WORKER_SLOT: web.AppKey[WorkerSlot] = web.AppKey("deepinfer_worker_slot", WorkerSlot)


def name_worker(slot: WorkerSlot) -> Callable[[web.Request, web.StreamResponse],
                                              Awaitable[None]]:
    """Every answer says which worker gave it (`x-deepinfer-worker`): to tell how the
    kernel spreads connections, and where to look in the logs."""
    index = str(slot.index)

    async def on_prepare(_request: web.Request, response: web.StreamResponse) -> None:
        response.headers["x-deepinfer-worker"] = index

    return on_prepare


def forwarded_headers(request: web.Request) -> dict[str, str]:
    return {k: v for k in _FORWARDED if (v := request.headers.get(k)) is not None}


def replicate_writes(siblings: Siblings, handler: Handler) -> Handler:
    """An admin write, done here and then on every sibling (admin writes reach every
    worker before the client hears back). A registration is replayed with the instance
    this worker gave it, so that every worker names the engine's instance alike."""

    async def replicated(request: web.Request) -> web.StreamResponse:
        response = await handler(request)
        if response.status >= 400 or via_sibling(request):
            return response
        body = await request.read()
        if request.method == "POST" and request.path == "/admin/engines" and isinstance(
                response, web.Response) and isinstance(response.body, bytes):
            body = _with_instance(body, response.body)
        answers = await siblings.call(request.method, request.raw_path, body,
                                      forwarded_headers(request))
        for status, text in answers:
            if status >= 400:
                log.warning("a sibling refused the replayed %s %s: %d %s", request.method,
                            request.path[:200], status, text[:200])
        return response

    return replicated


def _with_instance(request_body: bytes, response_body: bytes) -> bytes:
    try:
        record, answer = orjson.loads(request_body), orjson.loads(response_body)
    except orjson.JSONDecodeError:
        return request_body
    if isinstance(record, dict) and isinstance(answer, dict) and isinstance(
            answer.get("instance"), str):
        record["instance"] = answer["instance"]
        return orjson.dumps(record)
    return request_body


def gather_metrics(siblings: Siblings, handler: Handler) -> Handler:
    """/metrics for the whole router: this worker's exposition merged with its siblings'."""

    async def gathered(request: web.Request) -> web.StreamResponse:
        response = await handler(request)
        if via_sibling(request) or not isinstance(response, web.Response):
            return response
        answers = await siblings.call_each("GET", request.raw_path,
                                           headers=forwarded_headers(request))
        own = bytes(response.body) if isinstance(response.body, bytes | bytearray) else b""
        # A sibling that does not answer this time (busy, restarting) counts with what it
        # said last: a sum that dips would read as a counter reset. (A worker that
        # restarts does start again from zero, as a restarted router does.)
        last = siblings.last_metrics
        for i, answer in enumerate(answers):
            if answer is not None and answer[0] == 200:
                last[i] = answer[1].decode()
        others = [text for text in last if text is not None]
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
        answers = await siblings.call("GET", request.raw_path,
                                      headers=forwarded_headers(request))
        for status, body in answers:
            if status == 200:
                return web.Response(body=body, content_type="application/json")
        return response

    return asked


async def receive_sync(request: web.Request) -> web.Response:
    """A sibling's news (only over the private socket: from TCP it does not exist):
    {"worker": index, "hints": [placements], "inflight": {engine: count}}."""
    if not via_sibling(request):
        return error_response(404, f"No route {request.path[:200]}.", "not_found")
    app = request.app
    try:
        news = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return error_response(400, "Malformed sibling news.", "invalid_json")
    if not isinstance(news, dict) or not isinstance(news.get("worker"), int):
        return error_response(400, "Malformed sibling news.", "invalid_body")
    now = time.monotonic()
    hints = news.get("hints")
    if isinstance(hints, list) and hints:
        app[STATE].policy.import_hints((h for h in hints if isinstance(h, dict)), now,
                                       fleet_lookup(app))
    counts = news.get("inflight")
    if isinstance(counts, dict):
        siblings = app[SIBLINGS]
        siblings.heard(news["worker"], {k: v for k, v in counts.items()
                                        if isinstance(k, str) and type(v) is int}, now)
        app[STATE].fleet.set_sibling_inflight(siblings.inflight(now, SILENT_S), now)
    return web.Response(status=204)


async def send_state(request: web.Request) -> web.Response:
    """What a worker that starts again needs from a sibling before it serves: the
    embedded registry's engines (with the time their leases have left) and the drained
    engines. Only over the private socket."""
    if not via_sibling(request):
        return error_response(404, f"No route {request.path[:200]}.", "not_found")
    state = request.app[STATE]
    # the embedded registry's (registry/local.py; Redis is every worker's already)
    leases_of = getattr(state.writable, "leases", None)
    leases = leases_of() if callable(leases_of) else []
    return web.Response(body=orjson.dumps({
        "engines": [{"record": r.model_dump(mode="json"), "ttl_s": ttl} for r, ttl in leases],
        "draining": [eid for eid, s in state.fleet.engines.items() if s.draining],
    }), content_type="application/json")


async def catch_up(app: web.Application, siblings: Siblings) -> bool:
    """Take over a sibling's registrations and drains (see `send_state`). False when no
    sibling answered (the first start: there is nothing to catch up on)."""
    state = app[STATE]
    for answer in await siblings.call_each("GET", STATE_PATH):
        if answer is None or answer[0] != 200:
            continue
        try:
            news = orjson.loads(answer[1])
            if state.writable is not None and hasattr(state.writable, "leases"):
                for lease in news["engines"]:
                    record = EngineRecord.model_validate(lease["record"])
                    await state.writable.register(record, float(lease["ttl_s"]))
            for engine_id in news["draining"]:
                state.fleet.set_draining(str(engine_id), True)
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            log.warning("a sibling's state could not be read: %s", exc)
            continue
        return True
    return False


def fleet_lookup(app: web.Application) -> EngineLookup:
    fleet = app[STATE].fleet

    def lookup(engine_id: str) -> tuple[str, int] | None:
        engine = fleet.engines.get(engine_id)
        if engine is None:
            return None
        return engine.record.instance, fleet.kv_capacity_chars(engine)

    return lookup


class SiblingSync(Periodic):
    """Every `interval_s`, tells every sibling this worker's new placements (the request
    path only appends them to the policy's outbox) and its requests in flight per engine
    (when they changed, and at least every `HEARTBEAT_S`), and forgets the counts of a
    sibling gone silent."""

    def __init__(self, siblings: Siblings, fleet: Fleet,
                 export: Callable[[int], list[dict[str, Any]]],
                 interval_s: float = 0.02) -> None:
        super().__init__(interval_s, "worker-sync")
        self._siblings = siblings
        self._fleet = fleet
        self._export = export
        self._told: dict[str, int] | None = None
        self._told_at = 0.0
        self.sent = 0  # hints, for tests

    async def run_once(self) -> None:
        now = time.monotonic()
        self._fleet.set_sibling_inflight(self._siblings.inflight(now, SILENT_S), now)
        hints = self._export(MAX_HINT_BATCH)
        counts = self._fleet.inflight_by_engine()
        if not hints and counts == self._told and now - self._told_at < HEARTBEAT_S:
            return
        self._told, self._told_at = counts, now
        news = {"worker": self._siblings.slot.index, "hints": hints, "inflight": counts}
        await self._siblings.call("POST", SYNC_PATH, orjson.dumps(news),
                                  {"Content-Type": "application/json"}, _SYNC_TIMEOUT_S)
        self.sent += len(hints)
