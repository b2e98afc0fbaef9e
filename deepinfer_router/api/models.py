"""`GET /v1/models`: the union of the models served by healthy engines."""

from __future__ import annotations

import time

import orjson
from aiohttp import web

from ..errors import RouterError
from ..proxy import check_api_key
from ..state import STATE


async def list_models(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        check_api_key(state.tenant_table.keys, request.headers.get("Authorization", ""))
    except RouterError as exc:
        return exc.response()
    now = time.monotonic()
    data = []
    for model in state.fleet.models(now):
        max_len = max(
            (
                s.record.capacity.max_model_len or 0
                for s in state.fleet.engines.values()
                if model in s.record.models
            ),
            default=0,
        )
        entry: dict[str, object] = {
            "id": model, "object": "model", "created": 0, "owned_by": "deepinfer",
        }
        if max_len:
            entry["max_model_len"] = max_len
        data.append(entry)
    return web.Response(
        body=orjson.dumps({"object": "list", "data": data}), content_type="application/json"
    )
