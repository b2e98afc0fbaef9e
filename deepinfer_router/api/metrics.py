"""`GET /metrics` in Prometheus text format."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ..state import STATE


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.metrics.registry_up.set(1 if all(s.status()["up"] for s in state.sources) else 0)
    body = generate_latest(state.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
