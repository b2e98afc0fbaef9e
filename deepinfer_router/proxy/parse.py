"""A request's body into what routing needs: the model, whether it streams, the session
key, the parsed JSON (for the policy's prompt features). Takes bytes and strings, not an
aiohttp request, so it is unit-tested as it is.

Bounds come before parsing, each cheap: a declared length over --max-body-mb is refused
before any byte is read (`check_declared_length`); a JSON body with more than
--max-json-items values is refused before it is materialised (json_limits.py); a
multipart body is never parsed whole, only its part headers are scanned for `model`
(multipart.py). Bodies over _LARGE_BODY yield to the event loop between steps (each is
C code over the whole body), so other requests run in between.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from ..errors import RouterError
from ..routing.features import session_key
from .json_limits import items_upper_bound, json_items_exceed
from .multipart import MalformedMultipart, multipart_model

_LARGE_BODY = 1 << 20


@dataclass(slots=True)
class ParsedRequest:
    model: str
    body: bytes  # as forwarded: the client's, or re-encoded with the default model
    stream: bool
    session_key: str | None
    json: dict[str, Any] | None  # None for multipart
    stream_usage: bool = False  # a stream that asked for usage in its last chunk


def max_body_bytes(max_body_mb: float) -> int:
    """--max-body-mb in bytes (the aiohttp app's client_max_size too)."""
    return int(max_body_mb * 1024 * 1024)


def body_too_large(max_body_mb: float) -> RouterError:
    return RouterError(
        413,
        f"Request body larger than {max_body_mb:g} MiB.",
        "body_too_large",
        headers={"Connection": "close"},
    )


def check_declared_length(declared: int | None, max_bytes: int, max_body_mb: float) -> None:
    """A declared length over the limit (`max_bytes`, from `max_body_bytes(max_body_mb)`)
    is refused before any byte of the body is read (aiohttp alone would read that much
    first)."""
    if declared is not None and declared > max_bytes:
        raise body_too_large(max_body_mb)


async def parse_request(
    body: bytes,
    content_type: str,
    session_header_value: str | None,
    *,
    max_json_items: int,
    served_models: Callable[[], Sequence[str]],
) -> ParsedRequest:
    """The request as routing sees it; RouterError (400) for a body it cannot route.
    `served_models()` is asked only when the body names no model: the only one served
    is then the model (and is written into a JSON body, for the engine)."""
    large = len(body) > _LARGE_BODY
    if large:  # each step over a large body gets its own turn of the loop
        await asyncio.sleep(0)
    parsed: dict[str, Any] | None = None
    if content_type.startswith("multipart/"):
        try:
            model: Any = multipart_model(content_type, body)
        except MalformedMultipart as exc:
            raise RouterError(400, f"Malformed multipart body: {exc}.", "invalid_body") from None
    else:
        # Every item is at least one byte: a body no longer than the limit is within it,
        # and the usual small body costs no counting at all.
        if (
            len(body) > max_json_items
            and (upper := items_upper_bound(body)) > max_json_items
            and await json_items_exceed(body, max_json_items, upper)
        ):
            raise RouterError(
                400,
                f"The JSON body has more than {max_json_items} values (--max-json-items).",
                "invalid_body",
            )
        if large:
            await asyncio.sleep(0)
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise RouterError(400, f"Malformed JSON body: {exc}", "invalid_json") from None
        if not isinstance(value, dict):
            raise RouterError(400, "The request body must be a JSON object.", "invalid_body")
        parsed = value
        model = parsed.get("model")
        if large:
            await asyncio.sleep(0)
    if model is None or model == "":
        served = served_models()
        if len(served) != 1:
            raise RouterError(
                400,
                "The request has no `model`; this router serves "
                f"{len(served)} models: {', '.join(served) or 'none'}.",
                "model_required",
            )
        model = served[0]
        if parsed is not None:  # the engine needs it too
            parsed["model"] = model
            body = orjson.dumps(parsed)
    if not isinstance(model, str):
        raise RouterError(400, "`model` must be a string.", "invalid_model")
    stream = parsed is not None and parsed.get("stream") is True
    options = parsed.get("stream_options") if stream and parsed is not None else None
    return ParsedRequest(
        model, body, stream, session_key(session_header_value, parsed), parsed,
        stream_usage=isinstance(options, dict) and options.get("include_usage") is True,
    )
