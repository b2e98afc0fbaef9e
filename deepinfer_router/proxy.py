"""The hot path: read the request, pick an engine, forward the body unchanged, relay the
answer (streams chunk by chunk), retry on another engine while nothing has reached the
client yet, and account for every request exactly once.

Which failures retry on another engine (up to --max-retries, jittered exponential
backoff), always only while no byte has reached the client:
- connection refused, connect timeout, reset, the engine closing the connection before
  its answer (kinds `connect`, `connect_timeout`, `reset`, `upstream`);
- a 5xx status from the engine except 501 (kind `status_<code>`): vLLM answers 500/502/503
  for engine faults (overload, dead engine core), and an OpenAI body carries no side
  effect that a second engine could double.
What does not retry: 4xx and 501 (passed to the client as they are), a first-byte or
total timeout (the engine may still be working on it: 504, kinds `first_byte_timeout`,
`total_timeout`), and anything after the first byte (the stream ends with an SSE error
event: kinds `idle_timeout`, `total_timeout`, `reset`). Every kind is counted in
`deepinfer_upstream_errors_total{engine,kind}` and counts towards ejection.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import random
import time
from collections.abc import Awaitable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from .admission import AdmissionRejected
from .errors import RouterError, sse_error_event
from .fleet import EngineState
from .json_limits import items_upper_bound, json_items_exceed
from .multipart import MalformedMultipart, multipart_model
from .request_ids import RequestIds
from .routing.base import Candidate, Decision, RequestFeatures
from .routing.features import session_key
from .state import REQUEST_ID, REQUEST_MODEL, RouterState
from .upstream import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamResponse,
)

log = logging.getLogger("deepinfer.proxy")

# Headers that belong to one connection, or that the router sets itself.
_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
        "Trailer", "Transfer-Encoding", "Upgrade", "Host", "Content-Length", "Date", "Server",
    )
)
# The router sets these itself: the engine key (or the client's), the request id, the
# forwarding chain (appended to); `Expect` was answered when the body was read.
_ROUTER_REQUEST_HEADERS = frozenset(("authorization", "x-request-id", "x-forwarded-for", "expect"))
# Response headers the router sets itself (an engine's own x-request-id is replaced).
_NOT_RELAYED = _HOP_BY_HOP | frozenset(("x-deepinfer-engine", "x-deepinfer-route", "x-request-id"))
# Bodies above this size yield to the event loop between reading, counting and parsing,
# so that other requests run between those steps (each is C code over the whole body).
_LARGE_BODY = 1 << 20
_ERROR_BODY_BYTES = 4096  # of an engine's 5xx body, kept for the message; the rest is dropped
# A write of at most this much into an empty socket buffer never waits (below the
# transport's high-water mark): no timer is armed for it.
_UNTIMED_WRITE = 65536
# One set lookup per header on the hot path instead of two.
_NOT_FORWARDED = _HOP_BY_HOP | _ROUTER_REQUEST_HEADERS


class _Retryable(Exception):
    """An engine failure before any byte reached the client: try another engine."""

    def __init__(self, kind: str, status: int, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.message = message


@dataclass(slots=True)
class _Call:
    """One client request as it moves through the proxy."""

    request: web.Request
    rid: str
    model: str
    body: bytes
    stream: bool
    features: RequestFeatures
    started: float
    parsed: dict[str, Any] | None  # the JSON body, until the features are taken from it
    route: str = "none"
    engine: str = ""
    status: int = 499  # until known: the client went away
    answered: bool = False  # the engine's response head arrived (this attempt)


class _StreamResponse(web.StreamResponse):
    """A StreamResponse whose headers leave with its first body chunk: one send() on the
    socket instead of two (aiohttp's own web.Response does the same). The proxy writes
    the first chunk right after prepare(), so the client gets the headers no later."""

    _send_headers_immediately = False


def request_id(request: web.Request, ids: RequestIds) -> str:
    """The client's X-Request-Id (forwarded and returned as it came), or a new one."""
    rid = request.get(REQUEST_ID)
    if rid is None:
        rid = request.headers.get("X-Request-Id") or ""
        if not rid or len(rid) > 200 or not rid.isprintable():  # logged: keep it sane
            rid = ids.next()
        request[REQUEST_ID] = rid
    return rid


def check_api_key(state: RouterState, request: web.Request) -> None:
    keys = state.settings.api_key
    if not keys:
        return
    auth = request.headers.get("Authorization", "")
    token = auth[7:] if auth[:7].lower() == "bearer " else ""
    # Compare against every key in constant time, so timing tells nothing about a key.
    # (Header bytes that are not UTF-8 arrive as surrogate escapes: encode them back.)
    raw = token.encode("utf-8", "surrogateescape")
    matched = False
    if not raw:  # settings refuse empty keys; an empty token never matches regardless
        raise RouterError(401, "Invalid or missing API key.", "invalid_api_key")
    for key in keys:
        matched |= hmac.compare_digest(raw, key.encode())
    if not matched:
        raise RouterError(401, "Invalid or missing API key.", "invalid_api_key")


def max_body_bytes(max_body_mb: float) -> int:
    """--max-body-mb in bytes (the aiohttp app's client_max_size too)."""
    return int(max_body_mb * 1024 * 1024)


class Proxy:
    def __init__(self, state: RouterState) -> None:
        self.state = state
        s = state.settings
        self._engine_auth = f"Bearer {s.engine_api_key}" if s.engine_api_key else None
        self._strip_client_auth = bool(s.api_key) or self._engine_auth is not None
        # Client headers not forwarded: the client's Authorization passes as it came
        # (repeated ones too) unless the router checks keys or sends its own.
        self._not_forwarded = (
            _NOT_FORWARDED if self._strip_client_auth else _NOT_FORWARDED - {"authorization"}
        )
        self._first_byte_timeout = s.first_byte_timeout_s
        self._idle_timeout = s.stream_idle_timeout_s
        self._total_timeout = s.request_timeout_s
        self._policy_needs_prompt = state.policy.needs_prompt
        self._max_body = max_body_bytes(s.max_body_mb)
        self._ids = RequestIds()

    # --- entry point ------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        state = self.state
        rid = request_id(request, self._ids)
        started = time.monotonic()
        call: _Call | None = None
        try:
            if state.shutting_down:
                raise RouterError(503, "The router is shutting down.", "shutting_down")
            check_api_key(state, request)
            call = await self._parse(request, rid, started)
            return await self._admit_and_route(call)
        except RouterError as exc:
            if not isinstance(exc, _UpstreamFailure):  # those count as upstream errors
                state.metrics.rejected.labels(exc.code or str(exc.status)).inc()
            model = call.model if call else ""
            if model and not state.fleet.known_model(model):
                model = ""  # a client-chosen name must not become a label (unbounded series)
            state.metrics.requests.labels(
                model, call.engine if call else "", call.route if call else "none",
                str(exc.status),
            ).inc()
            resp = exc.response()
            resp.headers["X-Request-Id"] = rid
            return resp

    # --- parsing ------------------------------------------------------------------------
    async def _parse(self, request: web.Request, rid: str, started: float) -> _Call:
        state = self.state
        settings = state.settings
        # A declared length over --max-body-mb is refused before any byte of the body is
        # read (aiohttp alone would read that much first).
        declared = request.content_length
        if declared is not None and declared > self._max_body:
            raise self._too_large()
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:  # read past the limit (chunked body)
            raise self._too_large() from None
        large = len(body) > _LARGE_BODY
        if large:  # each step over a large body gets its own turn of the loop
            await asyncio.sleep(0)
        content_type = request.headers.get("Content-Type", "")
        parsed: dict[str, Any] | None = None
        if content_type.startswith("multipart/"):
            try:
                model: Any = multipart_model(content_type, body)
            except MalformedMultipart as exc:
                raise RouterError(
                    400, f"Malformed multipart body: {exc}.", "invalid_body"
                ) from None
        else:
            limit = settings.max_json_items
            # Every item is at least one byte: a body no longer than the limit is within
            # it, and the usual small body costs no counting at all.
            if (
                len(body) > limit
                and (upper := items_upper_bound(body)) > limit
                and await json_items_exceed(body, limit, upper)
            ):
                raise RouterError(
                    400,
                    f"The JSON body has more than {limit} values "
                    "(--max-json-items).",
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
        now = time.monotonic()
        if model is None or model == "":
            served = state.fleet.models(now)
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
        request[REQUEST_MODEL] = model
        stream = parsed is not None and parsed.get("stream") is True
        key = session_key(request.headers.get(settings.session_header), parsed)
        features = RequestFeatures(model=model, session_key=key)
        return _Call(request, rid, model, body, stream, features, started, parsed)

    def _too_large(self) -> RouterError:
        return RouterError(
            413,
            f"Request body larger than {self.state.settings.max_body_mb:g} MiB.",
            "body_too_large",
            headers={"Connection": "close"},
        )

    def _take_features(self, call: _Call) -> None:
        """Prompt features for the routing policy, once the model is known to be served
        (an unknown model costs no hashing); the parsed body is dropped after."""
        parsed, call.parsed = call.parsed, None
        if self._policy_needs_prompt and parsed is not None:
            call.features = self.state.policy.prompt_features(
                parsed, call.model, call.features.session_key
            )

    # --- admission and routing ---------------------------------------------------------
    async def _admit_and_route(self, call: _Call) -> web.StreamResponse:
        state = self.state
        fleet = state.fleet
        if not fleet.known_model(call.model):
            # A client-chosen name: logged escaped and cut, so it cannot forge log lines.
            call.request[REQUEST_MODEL] = ascii(call.model[:200])
            served = fleet.models(time.monotonic())
            raise RouterError(
                404,
                f"The model `{call.model[:200]}` does not exist. Available models: "
                f"{', '.join(served) or 'none'}.",
                "model_not_found",
                available_models=served,
            )
        self._take_features(call)
        admission = state.admission
        if not admission.try_acquire():
            wait_started = time.monotonic()
            try:
                await admission.acquire()
            except AdmissionRejected as exc:
                raise RouterError(
                    429, "The router is at capacity; retry shortly.", exc.reason,
                    headers={"Retry-After": "1"},
                ) from None
            state.metrics.queue_wait.observe(time.monotonic() - wait_started)
        try:
            return await self._route_with_retries(call)
        finally:
            admission.release()

    async def _route_with_retries(self, call: _Call) -> web.StreamResponse:
        state = self.state
        settings = state.settings
        tried: list[str] = []
        last: _Retryable | None = None
        for attempt in range(settings.max_retries + 1):
            if last is not None:  # a retry: only when some engine is left to try
                if not state.fleet.candidates(call.model, time.monotonic(), exclude=tried):
                    break
                backoff = settings.retry_backoff_s * (2 ** (attempt - 1))
                await asyncio.sleep(backoff * (0.5 + random.random()))
            now = time.monotonic()
            untried = state.fleet.candidates(call.model, now, exclude=tried)
            candidates = [c for c in untried if c.inflight < settings.max_inflight_per_engine]
            if not candidates and untried:
                # every engine not tried yet is at its limit: wait for room on one
                candidates = await self._wait_for_engine(call, tried)
                now = time.monotonic()
            if not candidates:
                if last is not None:
                    break
                raise RouterError(
                    503, f"No healthy engine serves `{call.model}` right now.", "no_engine",
                    headers={"Retry-After": "2"},
                )
            if last is not None:  # counted once there is an engine to retry on
                state.metrics.retries.labels(last.kind).inc()
                log.info(
                    "request %s: engine %s failed (%s), retrying on another engine",
                    call.rid, tried[-1], last.message,
                )
            t0 = time.perf_counter()
            decision = state.policy.select(call.features, candidates, now)
            state.metrics.routing_decision_seconds.observe(time.perf_counter() - t0)
            state.metrics.routing_decisions_by(state.policy.name, decision.reason).inc()
            try:
                return await self._attempt(call, decision, now)
            except _EngineTimeout as exc:
                raise _UpstreamFailure(exc.status, exc.message, exc.kind) from None
            except _Retryable as exc:
                last = exc
                tried.append(decision.engine_id)
        assert last is not None
        raise _UpstreamFailure(last.status, last.message, last.kind)

    async def _wait_for_engine(self, call: _Call, tried: list[str]) -> list[Candidate]:
        """Every engine serving the model (but those in `tried`) is at
        --max-inflight-per-engine: wait in the admission queue until one may have room (a
        request to one finished, or one joined, came back or was un-drained). An empty
        list when no such engine serves the model any more; 429 when the queue is full
        or the wait lasts longer than --queue-timeout-s."""
        state = self.state
        admission = state.admission
        limit = state.settings.max_inflight_per_engine
        started = time.monotonic()
        give_up = started + admission.queue_timeout_s
        ticket = admission.engine_ticket()
        requeue = False  # woken but beaten to the slot: back to the same place in line
        while True:
            try:
                await admission.wait_engine_slot(
                    call.model, give_up - time.monotonic(), ticket, requeue
                )
            except AdmissionRejected as exc:
                raise RouterError(
                    429, "Every engine serving this model is at its limit; retry shortly.",
                    f"engine_{exc.reason}", headers={"Retry-After": "1"},
                ) from None
            requeue = True
            now = time.monotonic()
            every = state.fleet.candidates(call.model, now, exclude=tried)
            candidates = [c for c in every if c.inflight < limit]
            if candidates or not every:
                state.metrics.queue_wait.observe(now - started)
                return candidates

    # --- one attempt on one engine ----------------------------------------------------
    def _upstream_headers(self, call: _Call) -> list[tuple[str, str]]:
        """The client's headers for the engine: a list, so repeated headers stay repeated;
        without hop-by-hop headers, those the client's `Connection` names included."""
        client = call.request.headers
        drop = self._not_forwarded
        connection = client.get("Connection")
        if connection:
            drop = drop | {token.strip().lower() for token in connection.split(",")}
        headers = [(k, v) for k, v in client.items() if k.lower() not in drop]
        if self._engine_auth is not None:
            headers.append(("Authorization", self._engine_auth))
        headers.append(("X-Request-Id", call.rid))
        peer = call.request.remote or ""
        if "X-Forwarded-For" in client:
            peer = ", ".join((*client.getall("X-Forwarded-For"), peer))
        headers.append(("X-Forwarded-For", peer))
        return headers

    async def _attempt(
        self, call: _Call, decision: Decision, now: float
    ) -> web.StreamResponse:
        state = self.state
        fleet = state.fleet
        engine = fleet.request_started(decision.engine_id)
        if engine is None:  # left between selection and now
            raise _Retryable("gone", 503, "engine left the fleet")
        state.policy.on_routed(call.features, decision, now)
        call.engine, call.route = engine.id, decision.reason
        call.status = 499
        call.answered = False
        engine_ok = True
        final = True  # False when the error goes back to the retry loop
        try:
            return await self._exchange(call, engine)
        except _Retryable as exc:
            engine_ok = final = False
            state.metrics.upstream_errors.labels(engine.id, exc.kind).inc()
            raise
        finally:
            end = time.monotonic()
            if call.status in (502, 504):  # broke mid-stream
                engine_ok = False
            if engine_ok and call.status == 499:  # the client left: no verdict on the engine
                fleet.request_abandoned(engine, None if call.answered else now)
            else:
                fleet.request_finished(engine, engine_ok, end)
            if state.admission.engine_waiting:
                state.admission.engine_slot_freed(engine.record.models)
            state.policy.on_complete(call.features, engine.id, engine_ok, end)
            if final:
                state.metrics.requests_by(
                    call.model, engine.id, call.route, str(call.status)
                ).inc()
                state.metrics.request_duration_by(call.model).observe(end - call.started)

    async def _exchange(self, call: _Call, engine: EngineState) -> web.StreamResponse:
        """Send the request to `engine` and relay the answer, setting `call.status`;
        raises _Retryable while nothing has been sent to the client."""
        state = self.state
        request = call.request
        deadline = call.started + self._total_timeout
        first_byte_by = time.monotonic() + self._first_byte_timeout
        try:
            upstream = await state.upstream_pool().request(
                request.method,
                engine.record.url,
                request.path_qs,
                self._upstream_headers(call),
                call.body,
                head_by=min(first_byte_by, deadline),
            )
        except UpstreamConnectTimeout as exc:
            raise _Retryable("connect_timeout", 504, f"cannot connect to engine: {exc}") from None
        except TimeoutError:
            raise _EngineTimeout(_timeout_kind(deadline, "first_byte_timeout")) from None
        except UpstreamConnectError as exc:
            raise _Retryable("connect", 502, f"cannot connect to engine: {exc}") from None
        except UpstreamDisconnected as exc:
            raise _Retryable("reset", 502, f"engine closed the connection: {exc}") from None
        except UpstreamError as exc:
            raise _Retryable("upstream", 502, f"engine request failed: {exc}") from None
        call.answered = True
        try:
            if upstream.status >= 500 and upstream.status != 501:
                text = await self._error_text(upstream, deadline)
                raise _Retryable(
                    f"status_{upstream.status}",
                    502,
                    f"engine answered {upstream.status}: {text}",
                )
            content_type = upstream.header("Content-Type")
            if content_type.startswith("text/event-stream"):
                return await self._relay_stream(call, engine, upstream, first_byte_by)
            try:
                if upstream.complete:
                    # The whole body came with the headers (usual for a small JSON
                    # answer): read() will not wait, so skip arming a timer for it.
                    payload = await upstream.read()
                else:
                    async with asyncio.timeout(
                        min(self._idle_timeout, deadline - time.monotonic())
                    ):
                        payload = await upstream.read()
            except TimeoutError:
                raise _EngineTimeout(_timeout_kind(deadline, "idle_timeout")) from None
            except UpstreamError as exc:
                raise _Retryable("reset", 502, f"engine response broke off: {exc}") from None
            call.status = upstream.status
            response = web.Response(
                status=upstream.status, body=payload, headers=self._client_headers(upstream, call)
            )
            if len(payload) > _UNTIMED_WRITE:
                # aiohttp would write it after the handler, with no time limit: a client
                # that does not read would hold it (and its memory) for ever.
                try:
                    await response.prepare(request)
                    await self._write_timed(call, response.write_eof(), deadline)
                except (ConnectionResetError, aiohttp.ClientConnectionResetError, _ClientGone):
                    call.status = 499
            return response
        finally:
            upstream.close()  # pools the connection only if the response came in whole

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

    def _write(self, call: _Call, response: web.StreamResponse, data: bytes,
               deadline: float, eof: bool = False) -> Awaitable[None]:
        """A write to the client, bounded by the idle timeout and the request's deadline:
        a client that stops reading must not hold its engine slot for ever. A write
        that cannot wait (small, into an empty socket buffer) is returned as it is: no
        timer, no extra coroutine per chunk."""
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
        self, call: _Call, write: Coroutine[Any, Any, None], deadline: float
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
            raise _ClientGone from None

    def _client_headers(
        self, upstream: UpstreamResponse, call: _Call
    ) -> list[tuple[str, str]]:
        # A list, not a dict: repeated headers (Set-Cookie, ...) all reach the client.
        headers = [(k, v) for k, v in upstream.headers if k.lower() not in _NOT_RELAYED]
        headers += (
            ("x-deepinfer-engine", call.engine),
            ("x-deepinfer-route", call.route),
            ("X-Request-Id", call.rid),
        )
        return headers

    async def _relay_stream(
        self,
        call: _Call,
        engine: EngineState,
        upstream: UpstreamResponse,
        first_byte_by: float,
    ) -> web.StreamResponse:
        metrics = self.state.metrics
        content = upstream
        idle = self._idle_timeout
        deadline = call.started + self._total_timeout
        # Wait for the first chunk before answering the client: until then a failure can
        # still be retried elsewhere. vLLM sends a stream's headers at once and its first
        # chunk after prefill (and any queueing): that wait is the first-byte timeout's.
        try:
            first = content.read_nowait()  # often here with the headers: no timer then
            if not first:
                async with asyncio.timeout(min(first_byte_by, deadline) - time.monotonic()):
                    first = await content.readany()
        except TimeoutError:
            raise _EngineTimeout(_timeout_kind(deadline, "first_byte_timeout")) from None
        except UpstreamError as exc:
            raise _Retryable("reset", 502, f"engine stream broke off: {exc}") from None
        if not first:
            raise _Retryable("reset", 502, "engine closed the stream before any data")
        response = _StreamResponse(
            status=upstream.status, headers=self._client_headers(upstream, call)
        )
        await response.prepare(call.request)
        last = time.monotonic()
        metrics.ttft_by(call.model).observe(last - call.started)
        self.state.policy.on_first_token(call.features, engine.id, last)
        itl = metrics.itl_by(call.model)
        chunk = first
        try:
            # When the engine's stream has already ended with this chunk, the chunk and the
            # end of the chunked body leave in one send() (and, for the first chunk, the
            # headers too): nothing is held back, there is nothing left to wait for.
            if content.at_eof():
                await self._write(call, response, first, deadline, eof=True)
                call.status = upstream.status
                return response
            await self._write(call, response, first, deadline)
            while True:
                try:
                    async with asyncio.timeout(min(idle, deadline - last)):
                        chunk = await content.readany()
                except TimeoutError:
                    kind = _timeout_kind(deadline, "idle_timeout")
                    return await self._fail_stream(call, engine, response, kind, 504)
                except UpstreamError as exc:
                    return await self._fail_stream(call, engine, response, "reset", 502, exc)
                if not chunk:
                    break
                now = time.monotonic()
                itl.observe(now - last)
                last = now
                if content.at_eof():
                    await self._write(call, response, chunk, deadline, eof=True)
                    break
                await self._write(call, response, chunk, deadline)
            await self._write(call, response, b"", deadline, eof=True)
        except (ConnectionResetError, aiohttp.ClientConnectionResetError, _ClientGone):
            # The client left: closing `upstream` (in the caller) stops the engine.
            call.status = 499
            return response
        call.status = upstream.status
        return response

    async def _fail_stream(
        self,
        call: _Call,
        engine: EngineState,
        response: web.StreamResponse,
        kind: str,
        status: int,
        exc: BaseException | None = None,
    ) -> web.StreamResponse:
        """The engine failed after the client got bytes: end the client's stream with
        one SSE error event instead of leaving it hanging."""
        message = (
            _TIMEOUT_MESSAGES[kind] if kind in _TIMEOUT_MESSAGES
            else f"engine stream broke off: {exc}"
        )
        self.state.metrics.upstream_errors.labels(engine.id, kind).inc()
        log.warning("request %s: %s on engine %s", call.rid, message, engine.id)
        call.status = status
        with contextlib.suppress(
            ConnectionResetError, aiohttp.ClientConnectionResetError, _ClientGone
        ):
            deadline = time.monotonic() + self._idle_timeout  # the error event still leaves
            await self._write(
                call, response, sse_error_event(status, message, "upstream_error"), deadline,
                eof=True,
            )
        return response


_TIMEOUT_MESSAGES = {
    "first_byte_timeout": "The engine did not start answering within --first-byte-timeout-s.",
    "idle_timeout": "The engine sent nothing for --stream-idle-timeout-s.",
    "total_timeout": "The request took longer than --request-timeout-s.",
}


def _timeout_kind(deadline: float, kind: str) -> str:
    """`kind`, or `total_timeout` when the request's overall deadline is what ran out."""
    return "total_timeout" if time.monotonic() >= deadline - 0.001 else kind


class _ClientGone(Exception):
    """The client stopped reading for longer than the idle timeout; its connection was
    closed."""


class _EngineTimeout(_Retryable):
    """No byte from the engine in time. Not retried: the engine may still be working."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind, 504, _TIMEOUT_MESSAGES[kind])


class _UpstreamFailure(RouterError):
    """The engine failed (after retries): counted in deepinfer_upstream_errors_total, not
    as a rejection by the router."""
