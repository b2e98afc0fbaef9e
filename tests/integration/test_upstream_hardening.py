"""Regression tests for the hardening of the proxy's HTTP/1.1 client
(deepinfer_router/upstream/) and of how the proxy handles engine answers
(deepinfer_router/proxy/), over real sockets on 127.0.0.1: engine error bodies read
only in part and under the idle timeout, response heads capped, response framing
(bytes after the end, chunked trailers, a body ended by a reset or by a close, 101),
stale keep-alive connections, and the retries counter.

Most engines here are raw asyncio servers that write exact bytes (tests/support/
raw_engine.py): a real engine does not produce these faults. Each fault is checked
against `UpstreamPool` directly and through a real router."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import pytest
from multidict import CIMultiDictProxy
from prometheus_client.parser import text_string_to_metric_families

from deepinfer_router.settings import RouterSettings
from deepinfer_router.state import STATE
from deepinfer_router.upstream import (
    MAX_HEAD_BYTES,
    MAX_HEADER_FIELDS,
    UpstreamDisconnected,
    UpstreamPool,
    UpstreamProtocolError,
    connection,
)
from deepinfer_router.upstream import pool as upstream_pool
from tests.support.echo_engine import STATE as ENGINE
from tests.support.echo_engine import RunningServer
from tests.support.raw_engine import (
    Answer,
    Handler,
    raw_engine,
    raw_server,
    read_request_head,
    reset,
)
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(30)

MB = 1024 * 1024
CHAT = "/v1/chat/completions"
BODY = orjson.dumps({"model": "m1", "messages": [{"role": "user", "content": "hi"}]})
BLOCK = b"e" * 65536
Router = Callable[..., Awaitable[RunningServer]]
Engines = Callable[..., Awaitable[RunningServer]]
Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter

# Two complete responses in one packet, for one request.
TWO_RESPONSES = (
    b'HTTP/1.1 200 OK\r\nContent-Length: 7\r\n\r\n{"a":1}'
    b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nINJECTED"
)
CHUNKED_WITH_TRAILER = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    b'7\r\n{"a":1}\r\n0\r\nSet-Cookie: evil=1\r\n\r\n'
)
# A body framed by neither Content-Length nor chunking: it ends when the server closes.
UNFRAMED_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n"
PARTIAL = b'{"partial": '
IDENTITY = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: identity\r\n"
    b'Connection: close\r\n\r\n{"whole": true}'
)
SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
)
MANY_FIELDS = (
    b"HTTP/1.1 200 OK\r\n"
    + b"".join(b"X-Field-%d: v\r\n" % i for i in range(MAX_HEADER_FIELDS + 50))
    + b"Content-Length: 2\r\n\r\nok"
)
OK = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n"
    b'{"ok":true}'
)


# --- helpers --------------------------------------------------------------------------


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    p = UpstreamPool(connect_timeout_s=2.0)
    yield p
    await p.close()


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes


async def post(http: aiohttp.ClientSession, r: RunningServer, timeout: float = 3.0) -> Reply:
    """One chat completion through the router, bounded by `timeout` seconds."""
    async with http.post(
        r.url + CHAT, data=BODY, headers={"Content-Type": "application/json"},
        timeout=aiohttp.ClientTimeout(total=timeout),
    ) as resp:
        body = await resp.read()
        return Reply(resp.status, resp.headers, body)


def openai_error(reply: Reply) -> dict[str, Any]:
    payload = orjson.loads(reply.body)
    assert isinstance(payload, dict) and isinstance(payload.get("error"), dict), reply.body
    err: dict[str, Any] = payload["error"]
    assert {"message", "type", "code"} <= err.keys(), err
    return err


async def metric(http: aiohttp.ClientSession, r: RunningServer, name: str) -> float:
    """The sum of the samples called `name` on the router's GET /metrics (0 if none)."""
    async with http.get(r.url + "/metrics", timeout=aiohttp.ClientTimeout(total=3)) as resp:
        text = await resp.text()
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    )


async def start_router(router: Router, urls: list[str], **settings: Any) -> RunningServer:
    """A router in front of `urls`, once all of them are healthy; no retries unless
    asked (a failure then shows as it is)."""
    settings.setdefault("max_retries", 0)
    r = await router(engine=urls, **settings)
    fleet = r.app[STATE].fleet
    await wait_until(
        lambda: sum(1 for e in fleet.engines.values() if e.state(time.monotonic()) == "healthy")
        >= len(urls),
        timeout=5,
    )
    return r


def no_tracebacks(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing logged an exception or a traceback (asyncio logs a protocol callback that
    raised as "Fatal error ..." with one), nor anything from aiohttp at ERROR."""
    bad = [
        rec for rec in caplog.records
        if rec.exc_info or "Traceback" in rec.getMessage() or "Fatal error" in rec.getMessage()
        or (rec.name.startswith("aiohttp") and rec.levelno >= logging.ERROR)
    ]
    assert not bad, [(rec.name, rec.getMessage(), rec.exc_info) for rec in bad]


async def write_until_closed(writer: Writer, block: bytes, total: int) -> int:
    """Write `block` until `total` bytes went out or the peer closed the connection;
    the bytes written. Yields to the loop after each block, as an engine in its own
    process would run alongside the router (drain() does not yield while the kernel
    takes the bytes: the engine would fill the socket buffers, megabytes, before the
    client on the same loop read any of it)."""
    sent = 0
    with contextlib.suppress(ConnectionError):
        while sent < total:
            writer.write(block)
            await writer.drain()
            sent += len(block)
            await asyncio.sleep(0)
    return sent


async def wait_for_close(reader: Reader) -> None:
    """Until the peer closes the connection (FIN or RST), whatever it sends before."""
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass


def engine_answer(payload: bytes, then: str = "wait") -> Answer:
    """An answer to a request that was read: `payload` written in one piece, then "wait"
    for the client to close, "fin" (close) or "reset" (RST)."""

    async def answer(reader: Reader, writer: Writer, head: bytes) -> None:
        writer.write(payload)
        await writer.drain()
        if then == "reset":
            reset(writer)
        elif then == "fin":
            writer.close()
        else:
            await wait_for_close(reader)

    return answer


def answering(payload: bytes, then: str = "wait") -> Handler:
    """The same as a raw server's connection handler: read one request, answer it."""
    answer = engine_answer(payload, then)

    async def handle(reader: Reader, writer: Writer) -> None:
        await answer(reader, writer, await read_request_head(reader))

    return handle


# --- 1. engine error bodies are bounded -----------------------------------------------


def stalled_500(left: asyncio.Event) -> Answer:
    """An engine's 500 that announces 100 bytes of body, sends 7 (`{"error`) and goes
    silent; `left` is set when the client closed the connection."""

    async def answer(reader: Reader, writer: Writer, head: bytes) -> None:
        writer.write(
            b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"error'
        )
        await writer.drain()
        try:
            await wait_for_close(reader)
        finally:
            left.set()

    return answer


async def test_error_body_that_stalls_is_waited_for_only_the_idle_timeout(
    router: Router, http: aiohttp.ClientSession
) -> None:
    """An engine answers 500 with `Content-Length: 100`, sends 7 bytes of the body and
    goes silent. The router reads an engine's error body (for its message) only within
    --stream-idle-timeout-s: the client gets a 502 in the OpenAI error shape in about
    that time, and the engine sees its connection closed. Before, the router read the
    whole error body with no time limit: the request hung until the engine closed."""
    left = asyncio.Event()
    async with raw_engine(stalled_500(left)) as url:
        r = await start_router(router, [url], stream_idle_timeout_s=0.5, request_timeout_s=30)
        reply = await post(http, r, timeout=3)
        assert reply.status == 502
        err = openai_error(reply)
        assert "500" in err["message"]
        await asyncio.wait_for(left.wait(), 2)


async def test_stalled_error_body_start_is_kept_in_the_message(
    router: Router, http: aiohttp.ClientSession
) -> None:
    """What arrived of a stalled engine error body (`{"error`) is kept for the 502's
    message, as _error_text means to when its wait times out."""
    async with raw_engine(stalled_500(asyncio.Event())) as url:
        r = await start_router(router, [url], stream_idle_timeout_s=0.3)
        reply = await post(http, r, timeout=3)
        assert reply.status == 502
        assert '{"error' in openai_error(reply)["message"]


async def test_large_error_body_is_not_read_whole(
    router: Router, http: aiohttp.ClientSession
) -> None:
    """An engine answers 500 with a 50 MB body. The router keeps only the start of an
    error body for its message, then closes the connection: the client gets a 502 at
    once and the engine's writes fail long before it sent its body. Before, the router
    read the whole body into memory first."""
    total = 50 * MB
    sent: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def answer(reader: Reader, writer: Writer, head: bytes) -> None:
        writer.write(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n"
                     b"Content-Length: %d\r\n\r\n" % total)
        sent.set_result(await write_until_closed(writer, BLOCK, total))
        await wait_for_close(reader)

    async with raw_engine(answer) as url:
        r = await start_router(router, [url], stream_idle_timeout_s=2)
        reply = await post(http, r, timeout=3)
        assert reply.status == 502
        assert "500" in openai_error(reply)["message"]
        assert await asyncio.wait_for(sent, 2) < total // 2


async def test_read_prefix_reads_only_the_start_of_a_body(pool: UpstreamPool) -> None:
    """`UpstreamResponse.read_prefix(limit)` returns at least `limit` bytes of a body
    without waiting for the rest (closing the response then closes the connection: the
    server's writes fail early), and the whole body when it is shorter than `limit`."""
    total = 50 * MB
    sent: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def handle(reader: Reader, writer: Writer) -> None:
        head = await read_request_head(reader)
        if head.startswith(b"POST /small "):
            writer.write(b"HTTP/1.1 500 Oops\r\nContent-Length: 7\r\n\r\n" + b'{"a":1}')
            await writer.drain()
            await wait_for_close(reader)
            return
        writer.write(b"HTTP/1.1 500 Oops\r\nContent-Length: %d\r\n\r\n" % total)
        sent.set_result(await write_until_closed(writer, BLOCK, total))
        await wait_for_close(reader)

    async with raw_server(handle) as url:
        resp = await pool.request("POST", url, "/big", {}, b"x")
        prefix = await asyncio.wait_for(resp.read_prefix(4096), 2)
        assert 4096 <= len(prefix) < total
        assert set(prefix) == {ord("e")}
        assert not resp.complete
        resp.close()  # incomplete: the connection is closed, not pooled
        assert await asyncio.wait_for(sent, 2) < total // 2
        assert pool.idle_connections() == 0

        resp = await pool.request("POST", url, "/small", {}, b"x")
        assert await asyncio.wait_for(resp.read_prefix(4096), 2) == b'{"a":1}'
        assert resp.at_eof()
        resp.close()


# --- 2. response heads are capped -----------------------------------------------------


async def test_too_many_header_fields_is_a_protocol_error(pool: UpstreamPool) -> None:
    """A response with more than MAX_HEADER_FIELDS header fields is refused as invalid
    (UpstreamProtocolError) and its connection closed. Before, any number was kept."""
    async with raw_server(answering(MANY_FIELDS)) as url:
        with pytest.raises(UpstreamProtocolError):
            await asyncio.wait_for(pool.request("POST", url, "/", {}, b"x"), 2)
        assert pool.idle_connections() == 0
        await wait_until(lambda: pool.open_connections() == 0, timeout=2)


async def test_head_growing_past_the_limit_is_cut_off(pool: UpstreamPool) -> None:
    """A server that sends a status line and then header bytes without end: once more
    than MAX_HEAD_BYTES arrived without the end of the head, the request fails with
    UpstreamProtocolError and the connection is closed (the server's writes fail long
    before it sent 8 MB). Before, the head was parsed (and its header value kept) for as
    long as the server sent it."""
    total = 8 * MB
    sent: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def handle(reader: Reader, writer: Writer) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
        sent.set_result(await write_until_closed(writer, b"a" * 8192, total))
        await wait_for_close(reader)

    async with raw_server(handle) as url:
        with pytest.raises(UpstreamProtocolError):
            await asyncio.wait_for(pool.request("POST", url, "/", {}, b"x"), 2)
        assert MAX_HEAD_BYTES < await asyncio.wait_for(sent, 2) < total // 2
        await wait_until(lambda: pool.open_connections() == 0, timeout=2)


async def test_oversized_head_arriving_in_one_read_is_a_protocol_error(pool: UpstreamPool) -> None:
    """One 70 KB header, the whole response written at once: over MAX_HEAD_BYTES, so an
    UpstreamProtocolError."""
    payload = (b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEAD_BYTES + 4096)
               + b"\r\nContent-Length: 2\r\n\r\nok")
    async with raw_server(answering(payload)) as url:
        with pytest.raises(UpstreamProtocolError):
            await asyncio.wait_for(pool.request("POST", url, "/", {}, b"x"), 2)


async def test_head_under_the_limit_split_across_reads_is_accepted(
    pool: UpstreamPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 35 KB head (under MAX_HEAD_BYTES) that arrives in two reads is accepted."""
    reads = 0
    original = connection.Connection.data_received

    def counting(self: connection.Connection, data: bytes) -> None:
        nonlocal reads
        reads += 1
        original(self, data)

    monkeypatch.setattr(connection.Connection, "data_received", counting)

    async def handle(reader: Reader, writer: Writer) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * 35000 + b"\r\nX-B: b")
        await writer.drain()
        await wait_until(lambda: reads >= 1, timeout=2)  # the client has read that much
        writer.write(b"\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await wait_for_close(reader)

    async with raw_server(handle) as url:
        resp = await asyncio.wait_for(pool.request("POST", url, "/", {}, b"x"), 2)
        assert await resp.read() == b"ok"
        resp.close()


@pytest.mark.parametrize("head", ["endless_header", "too_many_fields"])
async def test_oversized_engine_head_becomes_a_502(
    router: Router, http: aiohttp.ClientSession, head: str
) -> None:
    """Through the router, an engine head over the limits (a header without end, or
    more than MAX_HEADER_FIELDS fields) is a 502 in the OpenAI error shape, at once, and
    the engine's connection is closed. Before, the router relayed the 150 fields, and
    kept reading the endless header (growing in memory) until the engine stopped."""
    total = 8 * MB
    closed: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def answer(reader: Reader, writer: Writer, head_: bytes) -> None:
        if head == "too_many_fields":
            writer.write(MANY_FIELDS)
            await writer.drain()
            sent = len(MANY_FIELDS)
        else:
            writer.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
            sent = await write_until_closed(writer, b"a" * 8192, total)
        await wait_for_close(reader)
        closed.set_result(sent)

    async with raw_engine(answer) as url:
        r = await start_router(router, [url], first_byte_timeout_s=10)
        reply = await post(http, r, timeout=3)
        assert reply.status == 502
        openai_error(reply)
        assert await asyncio.wait_for(closed, 2) < total // 2


# --- 3. response framing --------------------------------------------------------------


async def test_bytes_after_the_response_are_a_protocol_error(pool: UpstreamPool) -> None:
    """Two complete responses in one packet for one request: reading the body raises
    UpstreamProtocolError (the second response is not read as part of the first) and
    the connection is closed, never pooled. Before, the body read as
    `{"a":1}INJECTED` and the connection went back to the pool."""
    async with raw_server(answering(TWO_RESPONSES)) as url:
        resp = await pool.request("POST", url, "/", {}, b"x")
        assert resp.status == 200
        with pytest.raises(UpstreamProtocolError):
            await asyncio.wait_for(resp.read(), 2)
        resp.close()
        assert pool.idle_connections() == 0
        await wait_until(lambda: pool.open_connections() == 0, timeout=2)


async def test_router_never_relays_a_second_response(
    router: Router, http: aiohttp.ClientSession
) -> None:
    """Through the router with one engine, two responses to one request are a 502: the
    client never gets `INJECTED`. Before, it got a 200 with `{"a":1}INJECTED`."""
    async with raw_engine(engine_answer(TWO_RESPONSES)) as url:
        r = await start_router(router, [url])
        reply = await post(http, r)
        assert reply.status == 502, reply.body
        assert b"INJECTED" not in reply.body
        openai_error(reply)


async def test_chunked_trailers_are_not_response_headers(pool: UpstreamPool) -> None:
    """A chunked response's trailer (`Set-Cookie: evil=1` after the last chunk) is not
    added to the response's headers. Before, trailer fields were appended to them."""
    async with raw_server(answering(CHUNKED_WITH_TRAILER)) as url:
        resp = await pool.request("POST", url, "/", {}, b"x")
        assert await asyncio.wait_for(resp.read(), 2) == b'{"a":1}'
        assert resp.header("Set-Cookie") == ""
        assert [k for k, _ in resp.headers] == ["Content-Type", "Transfer-Encoding"]
        resp.close()


async def test_router_does_not_relay_chunked_trailers(
    router: Router, http: aiohttp.ClientSession
) -> None:
    """Through the router, the client gets the body of a chunked engine response and no
    Set-Cookie from its trailer. Before, the trailer's Set-Cookie reached the client."""
    async with raw_engine(engine_answer(CHUNKED_WITH_TRAILER)) as url:
        r = await start_router(router, [url])
        reply = await post(http, r)
        assert reply.status == 200
        assert reply.body == b'{"a":1}'
        assert "Set-Cookie" not in reply.headers


@pytest.mark.parametrize("end", ["reset", "fin"])
async def test_body_until_close_ended_by_a_reset_is_incomplete(
    pool: UpstreamPool, end: str
) -> None:
    """A body with neither Content-Length nor chunking ends when the server closes the
    connection: a reset (RST) after `{"partial": ` is a failure (UpstreamDisconnected),
    a clean close (FIN) still completes the body (regression guard: it passed before
    too). Before, the reset also completed the body, cut as it was."""
    async with raw_server(answering(UNFRAMED_HEAD + PARTIAL, then=end)) as url:
        resp = await pool.request("POST", url, "/", {}, b"x")
        assert resp.status == 200
        if end == "reset":
            with pytest.raises(UpstreamDisconnected):
                await asyncio.wait_for(resp.read(), 2)
        else:
            assert await asyncio.wait_for(resp.read(), 2) == PARTIAL
            assert resp.at_eof()
        resp.close()


@pytest.mark.parametrize("end", ["reset", "fin"])
async def test_router_does_not_pass_a_reset_body_as_complete(
    router: Router, http: aiohttp.ClientSession, end: str
) -> None:
    """Through the router: a body until close cut by a reset is a 502 (not a 200 with a
    partial body); one ended by a clean close is relayed whole (guard). Before, the
    client got `{"partial": ` with a 200."""
    async with raw_engine(engine_answer(UNFRAMED_HEAD + PARTIAL, then=end)) as url:
        r = await start_router(router, [url])
        reply = await post(http, r)
        if end == "reset":
            assert reply.status == 502, reply.body
            assert b"partial" not in reply.body
            openai_error(reply)
        else:
            assert reply.status == 200
            assert reply.body == PARTIAL


async def test_transfer_encoding_identity_runs_until_close(pool: UpstreamPool) -> None:
    """`Transfer-Encoding: identity` (not chunked) frames nothing: the body runs until
    the server closes, and a clean close ends it. Before, any Transfer-Encoding counted
    as framing, so the close read as a disconnection mid-body."""
    async with raw_server(answering(IDENTITY, then="fin")) as url:
        resp = await pool.request("POST", url, "/", {}, b"x")
        assert await asyncio.wait_for(resp.read(), 2) == b'{"whole": true}'
        assert resp.at_eof()
        resp.close()


async def test_router_relays_a_transfer_encoding_identity_body(
    router: Router, http: aiohttp.ClientSession
) -> None:
    """Through the router: a 200 with the whole body, and no upstream error counted.
    Before: a 502 and an upstream error (kind `reset`)."""
    async with raw_engine(engine_answer(IDENTITY, then="fin")) as url:
        r = await start_router(router, [url])
        reply = await post(http, r)
        assert reply.status == 200, reply.body
        assert reply.body == b'{"whole": true}'
        assert await metric(http, r, "deepinfer_upstream_errors_total") == 0


async def test_switching_protocols_is_a_protocol_error(pool: UpstreamPool) -> None:
    """A `101 Switching Protocols` answer is an UpstreamProtocolError and the connection
    is closed. Before, httptools' HttpParserUpgrade escaped data_received (asyncio logged
    a fatal transport error) and the request failed as a disconnection."""
    async with raw_server(answering(SWITCHING)) as url:
        with pytest.raises(UpstreamProtocolError):
            await asyncio.wait_for(pool.request("POST", url, "/", {}, b"x"), 2)
        await wait_until(lambda: pool.open_connections() == 0, timeout=2)


async def test_router_answers_a_101_with_a_502_and_no_traceback(
    router: Router, http: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the router, an engine's 101 is a 502 in the OpenAI error shape, and
    nothing is logged with a traceback. Before, asyncio logged "Fatal error:
    protocol.data_received() call failed." with the HttpParserUpgrade traceback."""
    caplog.set_level(logging.DEBUG)
    async with raw_engine(engine_answer(SWITCHING)) as url:
        r = await start_router(router, [url])
        reply = await post(http, r)
        assert reply.status == 502, reply.body
        openai_error(reply)
    no_tracebacks(caplog)


# --- 4. stale pooled connections ------------------------------------------------------


def keep_alive_server(connections: list[int], closed: list[int]) -> Handler:
    """A server that answers every request with `OK`, keeping connections alive; numbers
    its connections from 1, appends the number to `connections` for each request and to
    `closed` when the client closed the connection."""
    count = 0

    async def handle(reader: Reader, writer: Writer) -> None:
        nonlocal count
        count += 1
        number = count
        try:
            while True:
                await read_request_head(reader)
                connections.append(number)
                writer.write(OK)
                await writer.drain()
        finally:
            closed.append(number)

    return handle


async def test_idle_timeout_is_4s_and_an_older_idle_connection_is_not_reused(
    router: Router, echo_engines: Engines, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pool keeps idle connections for 4 s by default (setting
    upstream_keepalive_s), below vLLM's 5 s keep-alive, and a connection idle longer
    than that is closed instead of reused even before the sweeper gets to it. Before,
    30 s, and an expired connection stayed reusable until the sweeper ran."""
    assert RouterSettings.model_fields["upstream_keepalive_s"].default == 4.0
    e = await echo_engines()
    r = await router(engine=[e.url], upstream_keepalive_s=2.5)
    assert r.app[STATE].upstream_pool().idle_timeout_s == 2.5

    class Clock:
        offset = 0.0

        def monotonic(self) -> float:
            return time.monotonic() + self.offset

    clock = Clock()
    monkeypatch.setattr(upstream_pool, "time", clock)  # the pool's clock only
    connections: list[int] = []
    closed: list[int] = []
    p = UpstreamPool()
    try:
        assert p.idle_timeout_s == 4.0
        async with raw_server(keep_alive_server(connections, closed)) as url:
            for step in (3.9, 4.1):
                resp = await p.request("POST", url, "/", {}, b"x")
                assert await resp.read() == b'{"ok":true}'
                resp.close()
                assert p.idle_connections() == 1
                clock.offset += step  # idle that long
            resp = await p.request("POST", url, "/", {}, b"x")
            assert await resp.read() == b'{"ok":true}'
            resp.close()
            # 3.9 s idle: reused; 4.1 s idle: closed, and a new connection made.
            assert connections == [1, 1, 2]
            await wait_until(lambda: closed == [1], timeout=2)
    finally:
        await p.close()


async def test_connection_the_engine_closed_while_idle_is_sent_again_fresh() -> None:
    """A kept-alive connection that the engine closed while it sat in the pool, the
    close not yet seen by the pool when the next request goes out on it (the race every
    keep-alive client has): the request is sent once more on a fresh connection and
    succeeds. The engine's FIN is sent synchronously just before the request, so the
    pool does reuse the connection (a long idle timeout keeps it from expiring).
    Before, the request failed with UpstreamDisconnected."""
    seen: list[tuple[int, str]] = []
    writers: list[Writer] = []

    async def handle(reader: Reader, writer: Writer) -> None:
        number = len(writers) + 1
        writers.append(writer)
        await read_request_head(reader)
        seen.append((number, "answered"))
        writer.write(OK)
        await writer.drain()
        if number == 1:
            await read_request_head(reader)  # arrives after our FIN: cannot be answered
            seen.append((number, "unanswered"))
        await wait_for_close(reader)

    p = UpstreamPool(idle_timeout_s=30)
    try:
        async with raw_server(handle) as url:
            resp = await p.request("POST", url, "/", {}, b"x")
            assert await resp.read() == b'{"ok":true}'
            resp.close()
            assert p.idle_connections() == 1
            async with asyncio.timeout(2):
                # The engine closes its idle connection (FIN); the request goes out in the
                # same step, before the loop reads that FIN (request() runs inline up to
                # its first wait, when the request has been written).
                writers[0].write_eof()
                resp = await p.request("POST", url, "/", {}, b"x")
            assert resp.status == 200
            assert await resp.read() == b'{"ok":true}'
            resp.close()
            await wait_until(lambda: len(seen) == 3, timeout=2)
            assert sorted(seen) == [(1, "answered"), (1, "unanswered"), (2, "answered")]
    finally:
        await p.close()


async def test_reused_connection_that_broke_mid_answer_is_not_sent_again(
    pool: UpstreamPool
) -> None:
    """A reused connection that breaks after some bytes of the answer arrived is an
    error (UpstreamDisconnected), not sent again: the engine was answering, so the
    request may have had its effect. Guard for the resend above (this held before too,
    when no request was ever sent again)."""
    connections: list[int] = []

    async def handle(reader: Reader, writer: Writer) -> None:
        connections.append(len(connections) + 1)
        await read_request_head(reader)
        writer.write(OK)
        await writer.drain()
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
        await writer.drain()
        writer.close()

    async with raw_server(handle) as url:
        resp = await pool.request("POST", url, "/", {}, b"x")
        assert await resp.read() == b'{"ok":true}'
        resp.close()
        assert pool.idle_connections() == 1
        with pytest.raises(UpstreamDisconnected):
            await asyncio.wait_for(pool.request("POST", url, "/", {}, b"x"), 2)
        assert connections == [1]


async def test_router_recovers_from_an_engine_closing_an_idle_connection(
    router: Router, http: aiohttp.ClientSession
) -> None:
    """Through a router with one engine: the engine answers a request with keep-alive,
    then closes that connection when the next request arrives on it, without answering
    (its idle close crossing the router's request on the wire). The next request still
    gets a 200, sent again by the pool on a fresh connection: no failover, no retry and
    no upstream error counted. Before: a 502, a retry and an upstream error counted."""
    seen: list[tuple[int, str]] = []
    count = 0

    async def answer(reader: Reader, writer: Writer, head: bytes) -> None:
        nonlocal count
        count += 1
        number = count
        seen.append((number, "answered"))
        writer.write(OK)
        await writer.drain()
        if number == 1:
            await read_request_head(reader)
            seen.append((number, "closed unanswered"))
            return  # closes the connection
        await wait_for_close(reader)

    async with raw_engine(answer) as url:
        r = await start_router(router, [url], max_retries=2)
        for _ in range(2):
            reply = await post(http, r)
            assert reply.status == 200, reply.body
            assert reply.body == b'{"ok":true}'
        assert sorted(seen) == [(1, "answered"), (1, "closed unanswered"), (2, "answered")]
        assert await metric(http, r, "deepinfer_retries_total") == 0
        assert await metric(http, r, "deepinfer_upstream_errors_total") == 0


# --- 5. the retries counter -----------------------------------------------------------


async def test_no_retry_counted_without_another_engine(
    echo_engines: Engines, router: Router, http: aiohttp.ClientSession
) -> None:
    """One engine, answering 503, and --max-retries 2: the client gets a 502 and
    deepinfer_retries_total stays 0, as there is no other engine to retry on (the one
    failure is counted as an upstream error). Before, a retry was counted although none
    was made."""
    e = await echo_engines("a")
    e.app[ENGINE].fail_status = 503
    r = await start_router(router, [e.url], max_retries=2, retry_backoff_s=0.01)
    reply = await post(http, r)
    assert reply.status == 502
    assert "503" in openai_error(reply)["message"]
    assert len(e.app[ENGINE].received) == 1
    assert await metric(http, r, "deepinfer_retries_total") == 0
    assert await metric(http, r, "deepinfer_upstream_errors_total") == 1


async def test_one_retry_counted_when_another_engine_answers(
    echo_engines: Engines, router: Router, http: aiohttp.ClientSession
) -> None:
    """Two engines, the first tried answering 503: the client gets a 200 from the other
    and exactly one retry is counted (guard: this held before too)."""
    bad, good = await echo_engines("bad"), await echo_engines("good")
    bad.app[ENGINE].fail_status = 503
    r = await start_router(
        router, [bad.url, good.url], max_retries=2, retry_backoff_s=0.01, policy="round-robin"
    )
    for _ in range(2):  # round-robin: one of two requests tries the failing engine first
        reply = await post(http, r)
        assert reply.status == 200, reply.body
        if bad.app[ENGINE].received:
            break
    assert len(bad.app[ENGINE].received) == 1
    assert await metric(http, r, "deepinfer_retries_total") == 1
