"""OpenAI-shaped errors: `{"error": {"message", "type", "code"}}`, as JSON or as one SSE
event for a stream that has already started."""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

# HTTP status -> OpenAI error type, as OpenAI and vLLM name them.
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}


def error_body(status: int, message: str, code: str | None = None, **extra: Any) -> dict[str, Any]:
    err: dict[str, Any] = {
        "message": message,
        "type": _TYPES.get(status, "error"),
        "code": code or str(status),
    }
    err.update(extra)
    return {"error": err}


def error_response(
    status: int,
    message: str,
    code: str | None = None,
    headers: dict[str, str] | None = None,
    **extra: Any,
) -> web.Response:
    return web.Response(
        status=status,
        body=orjson.dumps(error_body(status, message, code, **extra)),
        content_type="application/json",
        headers=headers,
    )


def sse_error_event(status: int, message: str, code: str | None = None) -> bytes:
    """The tail of a broken stream: one error event, then [DONE], so clients stop cleanly."""
    return b"data: " + orjson.dumps(error_body(status, message, code)) + b"\n\ndata: [DONE]\n\n"


class RouterError(Exception):
    """An error to answer in the OpenAI shape."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers
        self.extra = extra

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.code, self.headers, **self.extra)
