"""Send a request to one engine and relay its answer to the client.

A JSON answer is read whole (within the idle and total timeouts) and written in one
piece. A stream's first chunk is awaited before the client is answered: until then a
failure is still an `EngineFailure` the dispatcher may retry elsewhere; vLLM sends a
stream's headers at once and its first chunk after prefill (and any queueing), so that
wait is the first-byte timeout's. After the first byte, failures end the client's stream
with one SSE error event. Writes to a client that stops reading are bounded by the idle
timeout, so it cannot hold its engine slot (and the answer's memory) for ever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import aiohttp
from aiohttp import web

from ..errors import sse_error_event
from ..fleet import EngineState
from ..state import RouterState
from ..upstream import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamResponse,
)
from .body_members import ASK_USAGE, SCHEDULING_LABEL, priority_member, with_members
from .call import Call
from .failures import TIMEOUT_MESSAGES, ClientGone, EngineTimeout, Retryable, timeout_kind
from .headers import EngineHeaders, client_headers
from .usage import UsageStripper, cached_tokens_in, usage_in

log = logging.getLogger("deepinfer.proxy")

_ERROR_BODY_BYTES = 4096  # of an engine's 5xx body, kept for the message; the rest is dropped
# A write of at most this much into an empty socket buffer never waits (below the
# transport's high-water mark): no timer is armed for it.
_UNTIMED_WRITE = 65536
_USAGE_TAIL = 1024  # bytes of the stream so far searched with a chunk, for a cut usage
_CLIENT_LEFT = (ConnectionResetError, aiohttp.ClientConnectionResetError, ClientGone)


class _StreamResponse(web.StreamResponse):
    """A StreamResponse whose headers leave with its first body chunk: one send() on the
    socket instead of two (aiohttp's own web.Response does the same). The relay writes
    the first chunk right after prepare(), so the client gets the headers no later."""

    _send_headers_immediately = False


class Relay:
    def __init__(
        self, state: RouterState, on_first_token: Callable[[Call, str, float], None]
    ) -> None:
        s = state.settings
        self.state = state
        self._on_first_token = on_first_token
        self._headers = EngineHeaders(s.engine_api_key, bool(s.api_key))
        self._first_byte_timeout = s.first_byte_timeout_s
        self._idle_timeout = s.stream_idle_timeout_s
        self._total_timeout = s.request_timeout_s
        self._priority_to_all = s.engine_priority == "all"

    async def exchange(self, call: Call, engine: EngineState) -> web.StreamResponse:
        """Send the request to `engine` and relay the answer, setting `call.status`;
        raises EngineFailure while nothing has been sent to the client."""
        request = call.request
        deadline = call.started + self._total_timeout
        first_byte_by = time.monotonic() + self._first_byte_timeout
        call.sent = True  # from here an engine may be doing the work
        try:
            upstream = await self.state.upstream_pool().request(
                request.method,
                engine.record.url,
                request.path_qs,
                self._headers.build(request.headers, call.rid, request.remote),
                self._body(call, engine),
                head_by=min(first_byte_by, deadline),
            )
        except UpstreamConnectTimeout as exc:
            raise Retryable("connect_timeout", 504, f"cannot connect to engine: {exc}") from None
        except TimeoutError:
            raise EngineTimeout(timeout_kind(deadline, "first_byte_timeout")) from None
        except UpstreamConnectError as exc:
            raise Retryable("connect", 502, f"cannot connect to engine: {exc}") from None
        except UpstreamDisconnected as exc:
            raise Retryable("reset", 502, f"engine closed the connection: {exc}") from None
        except UpstreamError as exc:
            raise Retryable("upstream", 502, f"engine request failed: {exc}") from None
        call.answered = True
        try:
            if upstream.status >= 500 and upstream.status != 501:
                text = await self._error_text(upstream, deadline)
                raise Retryable(
                    f"status_{upstream.status}",
                    502,
                    f"engine answered {upstream.status}: {text}",
                )
            content_type = upstream.header("Content-Type")
            if content_type.startswith("text/event-stream"):
                return await self._relay_stream(call, engine, upstream, first_byte_by)
            return await self._relay_whole(call, upstream, deadline)
        finally:
            upstream.close()  # pools the connection only if the response came in whole

    def _body(self, call: Call, engine: EngineState) -> bytes:
        """The body as the client sent it, or with the request's class as vLLM's
        `priority` for an engine that schedules by it, and with a request for the
        stream's usage when the router needs it (a tenant's token budget)."""
        members = []
        if call.priority is not None and (
                self._priority_to_all
                or engine.record.labels.get(SCHEDULING_LABEL) == "priority"):
            members.append(priority_member(call.priority))
        if call.add_usage:
            members.append(ASK_USAGE)
        if not members:
            return call.body
        return with_members(call.body, b",".join(members))

    async def _relay_whole(
        self, call: Call, upstream: UpstreamResponse, deadline: float
    ) -> web.StreamResponse:
        try:
            if upstream.complete:
                # The whole body came with the headers (usual for a small JSON answer):
                # read() will not wait, so skip arming a timer for it.
                payload = await upstream.read()
            else:
                async with asyncio.timeout(
                    min(self._idle_timeout, deadline - time.monotonic())
                ):
                    payload = await upstream.read()
        except TimeoutError:
            raise EngineTimeout(timeout_kind(deadline, "idle_timeout")) from None
        except UpstreamError as exc:
            raise Retryable("reset", 502, f"engine response broke off: {exc}") from None
        call.status = upstream.status
        if upstream.status == 200:
            self._take_usage(call, payload)
        response = web.Response(
            status=upstream.status,
            body=payload,
            headers=client_headers(upstream.headers, call.engine, call.route, call.rid,
                                   call.extra_headers or ()),
        )
        if len(payload) > _UNTIMED_WRITE:
            # aiohttp would write it after the handler, with no time limit: a client that
            # does not read would hold it (and its memory) for ever.
            try:
                await response.prepare(call.request)
                await self._write_timed(call, response.write_eof(), deadline)
            except _CLIENT_LEFT:
                call.status = 499
        return response

    async def _error_text(self, upstream: UpstreamResponse, deadline: float) -> str:
        """The start of an engine's error body, for the message: at most
        _ERROR_BODY_BYTES, waited for no longer than the idle timeout or the deadline.
        The connection is not reused unless the body came whole."""
        chunks: list[bytes] = []
        with contextlib.suppress(TimeoutError, UpstreamError):
            async with asyncio.timeout(min(self._idle_timeout, deadline - time.monotonic())):
                await upstream.read_prefix(_ERROR_BODY_BYTES, into=chunks)
        data = b"".join(chunks) + upstream.read_nowait()
        if not upstream.complete:
            upstream.close_connection()
        return data[:_ERROR_BODY_BYTES].decode("utf-8", "replace")[:500]

    def _write(self, call: Call, response: web.StreamResponse, data: bytes,
               deadline: float, eof: bool = False) -> Awaitable[None]:
        """A write to the client, bounded by the idle timeout and the request's deadline.
        A write that cannot wait (small, into an empty socket buffer) is returned as it
        is: no timer, no extra coroutine per chunk."""
        write = response.write_eof(data) if eof else response.write(data)
        transport = call.request.transport
        if (
            len(data) <= _UNTIMED_WRITE
            and transport is not None
            and not transport.get_write_buffer_size()
        ):
            return write
        return self._write_timed(call, write, deadline)

    async def _write_timed(
        self, call: Call, write: Coroutine[Any, Any, None], deadline: float
    ) -> None:
        try:
            async with asyncio.timeout(min(self._idle_timeout, deadline - time.monotonic())):
                await write
        except TimeoutError:
            log.warning(
                "request %s: the client read nothing for --stream-idle-timeout-s; closing",
                call.rid,
            )
            transport = call.request.transport
            if transport is not None:
                transport.abort()
            raise ClientGone from None

    async def _relay_stream(
        self,
        call: Call,
        engine: EngineState,
        upstream: UpstreamResponse,
        first_byte_by: float,
    ) -> web.StreamResponse:
        content = upstream
        idle = self._idle_timeout
        deadline = call.started + self._total_timeout
        try:
            first = content.read_nowait()  # often here with the headers: no timer then
            if not first:
                async with asyncio.timeout(min(first_byte_by, deadline) - time.monotonic()):
                    first = await content.readany()
        except TimeoutError:
            raise EngineTimeout(timeout_kind(deadline, "first_byte_timeout")) from None
        except UpstreamError as exc:
            raise Retryable("reset", 502, f"engine stream broke off: {exc}") from None
        if not first:
            raise Retryable("reset", 502, "engine closed the stream before any data")
        response = _StreamResponse(
            status=upstream.status,
            headers=client_headers(upstream.headers, call.engine, call.route, call.rid,
                                   call.extra_headers or ()),
        )
        await response.prepare(call.request)
        last = time.monotonic()
        self._on_first_token(call, engine.id, last)
        itl = self.state.metrics.itl_by(call.model)
        # Usage comes in the last chunk, when the client asked for it, or when the router
        # did (a tenant's token budget): then it is taken out of what the client gets.
        usage = (call.stream_usage or call.add_usage) and upstream.status == 200
        strip = UsageStripper() if call.add_usage and upstream.status == 200 else None
        chunk = tail = first
        if usage:
            self._take_usage(call, first)
        try:
            # When the engine's stream has already ended with this chunk, the chunk and the
            # end of the chunked body leave in one send() (and, for the first chunk, the
            # headers too): nothing is held back, there is nothing left to wait for.
            if content.at_eof():
                out = strip.feed(first) + strip.flush() if strip is not None else first
                await self._write(call, response, out, deadline, eof=True)
                call.status = upstream.status
                return response
            await self._write(call, response,
                              strip.feed(first) if strip is not None else first, deadline)
            while True:
                try:
                    async with asyncio.timeout(min(idle, deadline - last)):
                        chunk = await content.readany()
                except TimeoutError:
                    kind = timeout_kind(deadline, "idle_timeout")
                    return await self._fail_stream(call, engine, response, kind, 504)
                except UpstreamError as exc:
                    return await self._fail_stream(call, engine, response, "reset", 502, exc)
                if not chunk:
                    break
                now = time.monotonic()
                itl.observe(now - last)
                last = now
                if usage:
                    # (with what came before, when it did not end an event: reads may
                    # cut the usage anywhere)
                    scan = chunk if tail.endswith(b"\n\n") else tail + chunk
                    self._take_usage(call, scan)
                    tail = scan[-_USAGE_TAIL:]
                if strip is not None:
                    chunk = strip.feed(chunk)
                if content.at_eof():
                    if strip is not None:
                        chunk += strip.flush()
                    await self._write(call, response, chunk, deadline, eof=True)
                    break
                await self._write(call, response, chunk, deadline)
            await self._write(call, response, strip.flush() if strip is not None else b"",
                              deadline, eof=True)
        except _CLIENT_LEFT:
            # The client left: closing `upstream` (in the caller) stops the engine.
            call.status = 499
            return response
        call.status = upstream.status
        return response

    @staticmethod
    def _take_usage(call: Call, data: bytes) -> None:
        """The usage in `data` (an answer, or a stream's chunk), and the cached tokens
        the decision is graded by (read once, from the usage when it is whole)."""
        usage = usage_in(data)
        if usage is not None:
            call.usage = usage
        if call.decision is not None:
            found = usage.cached if usage is not None else cached_tokens_in(data)
            if found is not None:
                call.cached_tokens = found

    async def _fail_stream(
        self,
        call: Call,
        engine: EngineState,
        response: web.StreamResponse,
        kind: str,
        status: int,
        exc: BaseException | None = None,
    ) -> web.StreamResponse:
        """The engine failed after the client got bytes: end the client's stream with
        one SSE error event instead of leaving it hanging."""
        message = (
            TIMEOUT_MESSAGES[kind] if kind in TIMEOUT_MESSAGES
            else f"engine stream broke off: {exc}"
        )
        self.state.metrics.upstream_errors.labels(engine.id, kind).inc()
        log.warning("request %s: %s on engine %s", call.rid, message, engine.id)
        call.status = status
        with contextlib.suppress(*_CLIENT_LEFT):
            deadline = time.monotonic() + self._idle_timeout  # the error event still leaves
            await self._write(
                call, response, sse_error_event(status, message, "upstream_error"), deadline,
                eof=True,
            )
        return response
