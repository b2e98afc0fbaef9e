"""The proxy's aiohttp handler: a request id, the shutdown and API-key checks, the body
read within --max-body-mb and parsed (parse.py), then dispatch (dispatch.py); every
RouterError becomes an OpenAI-shaped answer, counted once."""

from __future__ import annotations

import time

from aiohttp import web

from ..errors import RouterError
from ..fairness.tenants import (
    DEFAULT_TENANT,
    header_tenant,
    lower_class,
    metric_tenant,
)
from ..routing.base import RequestFeatures
from ..state import REQUEST_ID, REQUEST_MODEL, RouterState
from .auth import check_api_key
from .call import Call
from .dispatch import Dispatcher
from .failures import UpstreamFailure
from .parse import body_too_large, check_declared_length, max_body_bytes, parse_request
from .request_ids import RequestIds


def request_id(request: web.Request, ids: RequestIds) -> str:
    """The client's X-Request-Id (forwarded and returned as it came), or a new one."""
    rid = request.get(REQUEST_ID)
    if rid is None:
        rid = request.headers.get("X-Request-Id") or ""
        if not rid or len(rid) > 200 or not rid.isprintable():  # logged: keep it sane
            rid = ids.next()
        request[REQUEST_ID] = rid
    return rid


class Proxy:
    def __init__(self, state: RouterState) -> None:
        self.state = state
        self.dispatcher = Dispatcher(state)
        self._ids = RequestIds()
        # Fixed for the router's life: computed once, not per request.
        settings = state.settings
        self._tenant_keys = state.tenant_table.keys
        self._tenant_header = settings.tenant_header
        self._tenants = state.tenant_table.names
        self._tenant_table = state.tenant_table
        self._engine_priority = settings.engine_priority != "off"
        self._max_body = max_body_bytes(settings.max_body_mb)
        fleet = state.fleet
        self._served_models = lambda: fleet.models(time.monotonic())

    async def handle(self, request: web.Request) -> web.StreamResponse:
        state = self.state
        rid = request_id(request, self._ids)
        started = time.monotonic()
        call: Call | None = None
        try:
            if state.shutting_down:
                raise RouterError(503, "The router is shutting down.", "shutting_down")
            headers = request.headers
            if self._tenant_keys:
                tenant = check_api_key(self._tenant_keys, headers.get("Authorization", ""))
            elif self._tenant_header:
                tenant = header_tenant(headers.get(self._tenant_header))
            else:
                tenant = DEFAULT_TENANT
            call = await self._read(request, rid, started)
            call.tenant = tenant
            call.tenant_label = metric_tenant(tenant, self._tenants)
            table = self._tenant_table
            call.klass = lower_class(table.klass(tenant), headers.get("X-Priority"),
                                     table.classes)
            if self._engine_priority and call.parsed is not None:  # a JSON body
                call.priority = table.classes.index(call.klass)
            return await self.dispatcher.dispatch(call)
        except RouterError as exc:
            if not isinstance(exc, UpstreamFailure):  # those count as upstream errors
                state.metrics.rejected.labels(exc.code or str(exc.status)).inc()
            model = call.model if call else ""
            if model and not state.fleet.known_model(model):
                model = ""  # a client-chosen name must not become a label (unbounded series)
            state.metrics.requests.labels(
                model, call.engine if call else "", call.route if call else "none",
                str(exc.status),
            ).inc()
            if call is not None:  # (a request refused before it was read has no tenant)
                state.metrics.tenant_requests_by(call.tenant_label, call.klass,
                                                 str(exc.status)).inc()
            resp = exc.response()
            resp.headers["X-Request-Id"] = rid
            return resp

    async def _read(self, request: web.Request, rid: str, started: float) -> Call:
        settings = self.state.settings
        check_declared_length(request.content_length, self._max_body, settings.max_body_mb)
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:  # read past the limit (chunked body)
            raise body_too_large(settings.max_body_mb) from None
        parsed = await parse_request(
            body,
            request.headers.get("Content-Type", ""),
            request.headers.get(settings.session_header),
            max_json_items=settings.max_json_items,
            served_models=self._served_models,
        )
        request[REQUEST_MODEL] = parsed.model
        features = RequestFeatures(model=parsed.model, session_key=parsed.session_key)
        return Call(
            request, rid, parsed.model, parsed.body, parsed.stream, features, started,
            parsed.json, stream_usage=parsed.stream_usage,
        )
