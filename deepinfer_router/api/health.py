"""`/health` (the process is alive) and `/ready` (at least one healthy engine)."""

from __future__ import annotations

import os
import time

import orjson
from aiohttp import web

from ..state import STATE
from ..workers.siblings import WORKER_SLOT


async def health(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def ready(request: web.Request) -> web.Response:
    state = request.app[STATE]
    now = time.monotonic()
    counts = state.fleet.state_counts(now)
    is_ready = counts["healthy"] > 0 and not state.shutting_down
    detail = {
        "ready": is_ready,
        "engines": counts,
        "models": state.fleet.models(now),
        "registry": [source.status() for source in state.sources],
        "shutting_down": state.shutting_down,
        # Per engine with a KV event feed: live (routing uses what the engine really
        # holds, for prompts given as token ids), rebuilding (a gap it could not fill:
        # the estimate decides) or down.
        "kv_event_feeds": state.kv_feeds.states() if state.kv_feeds is not None else {},
        "prompt_tokenizers": state.tokenizers.states() if state.tokenizers is not None else {},
    }
    slot = request.app.get(WORKER_SLOT)
    if slot is not None:  # --workers: which one answered (each answers alike)
        detail["worker"] = {"index": slot.index, "count": slot.count, "pid": os.getpid()}
    return web.Response(
        status=200 if is_ready else 503,
        body=orjson.dumps(detail),
        content_type="application/json",
    )
