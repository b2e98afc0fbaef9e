"""The router's access log: one line per request (logging itself is set up by
shared/log_setup.py, for the engine manager too)."""

from __future__ import annotations

import logging
import time

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from .state import REQUEST_ID, REQUEST_MODEL


class AccessLogger(AbstractAccessLogger):
    """method, route, model, engine, status, duration, request id: one line a request.
    API keys are never logged (no headers are)."""

    def log(self, request: BaseRequest, response: StreamResponse, elapsed: float) -> None:
        logger = self.logger
        if not logger.isEnabledFor(logging.INFO):
            return
        transport = request.transport
        if transport is not None and isinstance(transport.get_extra_info("sockname"), str):
            return  # --workers: a sibling's sync or replay over its Unix socket, not a client
        headers = response.headers
        engine = headers.get("x-deepinfer-engine", "-")
        route = headers.get("x-deepinfer-route", "-")
        model = request.get(REQUEST_MODEL, "-")
        rid = request.get(REQUEST_ID) or headers.get("X-Request-Id", "-")
        method, path, status = request.method, request.path, response.status
        # makeRecord + handle is logger.info() without findCaller()'s walk up the stack
        # (a line's source location is always this one): a quarter of the cost of a line.
        logger.handle(logger.makeRecord(
            logger.name, logging.INFO, __file__, 0,
            '%s %s model=%s engine=%s route=%s status=%s duration=%.4f request_id=%s',
            (method, path, model, engine, route, status, elapsed, rid), None, "log",
            {
                "method": method, "path": path, "model": model,
                "engine": engine, "route": route, "status": status,
                "duration_s": round(elapsed, 6), "request_id": rid,
                "at": round(time.time(), 3),
            },
        ))

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)
