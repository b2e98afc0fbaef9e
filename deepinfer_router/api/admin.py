"""Admin routes: list, register/heartbeat, remove and drain engines. Who may call them:
admin_access.py."""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web
from pydantic import ValidationError

from ..engine_address import check_engine_url
from ..errors import RouterError
from ..registry.base import RegistryUnavailableError
from ..shared.engine_record import EngineRecord
from ..state import STATE, RouterState
from .admin_access import check_admin


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


def _admin(handler: Any) -> Any:
    async def wrapped(request: web.Request) -> web.Response:
        state = request.app[STATE]
        try:
            check_admin(state.settings.admin_key, request)
            return await handler(state, request)  # type: ignore[no-any-return]
        except RouterError as exc:
            return exc.response()

    return wrapped


@_admin
async def list_engines(state: RouterState, request: web.Request) -> web.Response:
    now = time.monotonic()
    engines = []
    for s in sorted(state.fleet.engines.values(), key=lambda s: s.id):
        fresh = s.load.at and now - s.load.at <= state.settings.scrape_stale_s
        engines.append(
            {
                **s.record.model_dump(mode="json"),
                "source": s.source,
                "state": s.state(now),
                "inflight": s.inflight,
                "load": {
                    "waiting": s.load.waiting,
                    "running": s.load.running,
                    "kv_cache_usage": s.load.kv_usage,
                    "num_gpu_blocks": s.load.num_gpu_blocks,
                    "block_size": s.load.block_size,
                    "stale": not fresh,
                },
                "consecutive_failures": s.consecutive_failures,
            }
        )
    return _json({"engines": engines, "registry": [src.status() for src in state.sources]})


@_admin
async def register_engine(state: RouterState, request: web.Request) -> web.Response:
    try:
        payload = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise RouterError(400, f"Malformed JSON body: {exc}", "invalid_json") from None
    if not isinstance(payload, dict):
        raise RouterError(400, "The body must be an engine record object.", "invalid_body")
    ttl = payload.pop("ttl_s", None)
    if ttl is not None and (not isinstance(ttl, int | float) or ttl <= 0 or ttl > 86400):
        raise RouterError(400, "`ttl_s` must be a number of seconds in (0, 86400].", "invalid_ttl")
    try:
        record = EngineRecord.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "record"
        raise RouterError(400, f"Invalid engine record: {field}: {first['msg']}",
                          "invalid_engine_record") from None
    problem = await check_engine_url(record.url, state.settings.allow_private_engine_urls)
    if problem:
        raise RouterError(400, problem.message, problem.code)
    if state.writable is None:
        raise RouterError(503, "No writable registry.", "no_registry")
    owner = state.fleet.engines.get(record.id)
    if owner is not None and owner.source != state.writable.name:
        # One source never overwrites another's engine (ids are predictable hashes).
        if owner.record.url != record.url:
            raise RouterError(
                409, f"Engine {record.id} belongs to the {owner.source} registry.",
                "engine_id_taken",
            )
        # The same engine, also given as --engine: the operator's entry stands, and an
        # engine manager registering it keeps running.
        return _json({"id": record.id, "instance": record.instance, "registered": False,
                      "source": owner.source})
    try:
        await state.writable.register(record, ttl)
    except RegistryUnavailableError as exc:
        raise RouterError(503, str(exc), "registry_unavailable") from None
    return _json({"id": record.id, "instance": record.instance, "registered": True})


@_admin
async def delete_engine(state: RouterState, request: web.Request) -> web.Response:
    engine_id = request.match_info["id"]
    try:
        removed = state.writable is not None and await state.writable.deregister(engine_id)
    except RegistryUnavailableError as exc:
        raise RouterError(503, str(exc), "registry_unavailable") from None
    if not removed:
        raise RouterError(404, f"No registered engine {engine_id!r}.", "engine_not_found")
    return _json({"id": engine_id, "removed": True})


@_admin
async def drain_engine(state: RouterState, request: web.Request) -> web.Response:
    engine_id = request.match_info["id"]
    undo = request.query.get("undo") in ("1", "true")
    if not state.fleet.set_draining(engine_id, not undo):
        raise RouterError(404, f"No engine {engine_id!r}.", "engine_not_found")
    engine = state.fleet.engines[engine_id]
    return _json({"id": engine_id, "draining": engine.draining, "inflight": engine.inflight})


@_admin
async def get_decision(state: RouterState, request: web.Request) -> web.Response:
    """One recent routing decision, explained, and graded once the engine answered."""
    rid = request.match_info["request_id"]
    log = state.decisions
    record = log.get(rid) if log is not None else None
    if record is None:
        why = (f"kept for the last {log.size} requests" if log is not None
               else "the decision log is off (--decision-log-size 0)")
        raise RouterError(404, f"No recent routing decision for request `{rid[:200]}` "
                          f"({why}).", "decision_not_found")
    return _json(record.to_json())


@_admin
async def list_decisions(state: RouterState, request: web.Request) -> web.Response:
    """The newest decisions, newest first: ?limit= (default 50, at most 1000)."""
    raw = request.query.get("limit", "50")
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= 1000:
        raise RouterError(400, "`limit` must be an integer from 1 to 1000.", "invalid_limit",
                          param="limit")
    log = state.decisions
    records = log.recent(int(raw)) if log is not None else []
    return _json({"decisions": [r.to_json() for r in records],
                  "kept": log.size if log is not None else 0})
