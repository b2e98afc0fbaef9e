"""Requests that used to stall, bloat or confuse the router (issue: hot-path hardening),
each over real sockets against a real router: an oversized Content-Length, absurd JSON,
a multipart body of CRLFs, a client that stops reading, hop-by-hop and repeated headers,
an empty session header. Event-loop lag and memory figures for the hostile corpus are
measured by benchmarks/hostile.py, not here."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
import orjson
import pytest
from aiohttp import web

from deepinfer_router.state import STATE
from tests.support.echo_engine import STATE as ECHO
from tests.support.echo_engine import RunningServer
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


async def routable(router: RunningServer, engines: int = 1) -> None:
    fleet = router.app[STATE].fleet
    await wait_until(lambda: len(fleet.candidates("m1", time.monotonic())) == engines)


@contextlib.asynccontextmanager
async def raw_connection(port: int) -> AsyncIterator[tuple[asyncio.StreamReader,
                                                           asyncio.StreamWriter]]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()


async def test_oversized_content_length_is_refused_before_the_body(echo_engines, router):
    """A declared length over --max-body-mb gets 413 at once: no byte of the body is
    sent, and the answer must not wait for it."""
    engine = await echo_engines()
    r = await router(engine=[engine.url], max_body_mb=1)
    await routable(r)
    async with raw_connection(r.port) as (reader, writer):
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: 1000000000\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 413"), head
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:")))
        error = orjson.loads(await reader.readexactly(length))["error"]
        assert error["code"] == "body_too_large" and error["type"] == "invalid_request_error"


async def test_absurd_json_structure_is_refused_before_parsing(echo_engines, router, http):
    """More values than --max-json-items: 400 in the OpenAI shape, the engine never sees
    it; a large but sane token-id prompt still goes through."""
    engine = await echo_engines()
    r = await router(engine=[engine.url], max_json_items=10_000)
    await routable(r)
    for body in (b"[" + b"{}," * 20_000 + b"{}]",
                 orjson.dumps({**CHAT, "messages": [{}] * 20_000}),
                 orjson.dumps({"model": "m1", "prompt": [0] * 20_000})):
        async with http.post(r.url + "/v1/completions", data=body) as resp:
            assert resp.status == 400
            error = (await resp.json())["error"]
            assert error["code"] == "invalid_body" and "--max-json-items" in error["message"]
    assert engine.app[ECHO].received == []
    async with http.post(r.url + "/v1/completions",
                         json={"model": "m1", "prompt": list(range(9_000))}) as resp:
        assert resp.status == 200


async def test_multipart_model_found_by_a_bounded_scan(echo_engines, router, http):
    """The model field after a large file part is found (and the body forwarded
    unchanged); a body of CRLFs is refused as malformed instead of being parsed."""
    engine = await echo_engines()
    r = await router(engine=[engine.url], max_body_mb=16)
    await routable(r)
    audio = b"RIFF" + b"\r\n" * 200_000  # the echo engine takes up to 1 MiB
    body = (b'--B\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
            + audio + b'\r\n--B\r\nContent-Disposition: form-data; name="model"\r\n\r\nm1'
            b"\r\n--B--\r\n")
    headers = {"Content-Type": "multipart/form-data; boundary=B"}
    async with http.post(r.url + "/v1/audio/transcriptions", data=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
    assert engine.app[ECHO].raw[-1] == body
    crlf = b"\r\n" * (4 << 20)
    async with http.post(r.url + "/v1/audio/transcriptions", data=crlf, headers=headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "invalid_body"


async def big_stream(request: web.Request) -> web.StreamResponse:
    """20 MB of SSE events, as fast as the client takes them."""
    await request.read()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    event = b"data: " + b"x" * 65_000 + b"\n\n"
    with contextlib.suppress(ConnectionError):
        for _ in range(320):
            await resp.write(event)
        await resp.write_eof()
    return resp


async def healthy(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [{"id": "m1", "object": "model"}]})


async def test_client_that_stops_reading_releases_its_engine(serve_app, router):
    """A client with a tiny receive buffer that never reads a 20 MB stream: after
    --stream-idle-timeout-s of no progress the router closes it and frees the engine
    slot (before: held until the client closed its socket)."""
    app = web.Application()
    app.router.add_post("/v1/completions", big_stream)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", healthy)
    engine = await serve_app(app)
    r = await router(engine=[engine.url], stream_idle_timeout_s=0.5)
    await routable(r)
    fleet = r.app[STATE].fleet
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", r.port))
    body = orjson.dumps({"model": "m1", "prompt": "hi", "stream": True})
    await loop.sock_sendall(sock, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    try:
        await wait_until(lambda: sum(e.inflight for e in fleet.engines.values()) == 1)
        await wait_until(lambda: sum(e.inflight for e in fleet.engines.values()) == 0,
                         timeout=10)
        # The router closed the client's connection: reading drains what was sent, then EOF.
        received = 0
        while True:
            chunk = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 5)
            if not chunk:
                break
            received += len(chunk)
        assert received < 20_000_000
    except ConnectionResetError:
        pass  # closed with unread data on its side: also closed
    finally:
        sock.close()
    async with aiohttp.ClientSession() as s, s.get(r.url + "/metrics") as resp:
        text = await resp.text()
    assert 'status="499"' in text


async def test_forwarded_headers(echo_engines, router):
    """Headers the client's Connection header names stay on this hop; repeated headers
    stay repeated; X-Forwarded-For is appended to; Expect is not forwarded."""
    engine = await echo_engines()
    r = await router(engine=[engine.url])
    await routable(r)
    body = orjson.dumps(CHAT)
    async with raw_connection(r.port) as (reader, writer):
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Connection: keep-alive, X-Hop-Secret\r\nX-Hop-Secret: s3cret\r\n"
            b"X-Multi: a\r\nX-Multi: b\r\nX-Forwarded-For: 10.1.2.3\r\n"
            b"Expect: 100-continue\r\nContent-Type: application/json\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 100"), head
        writer.write(body)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200"), head
    seen = engine.app[ECHO].headers[-1]
    assert "X-Hop-Secret" not in seen
    assert seen.getall("X-Multi") == ["a", "b"]
    assert seen.getall("X-Forwarded-For") == ["10.1.2.3, 127.0.0.1"]
    assert "Expect" not in seen


@pytest.mark.parametrize("policy", ["session", "kv-aware"])
async def test_empty_session_header_means_no_session(echo_engines, router, http, policy):
    """`X-Session-ID:` with nothing in it is no session key (it used to be the key "",
    shared by every such request); the body's `user` is used instead when present."""
    engines = [await echo_engines(name) for name in ("a", "b")]
    r = await router(engine=[e.url for e in engines], policy=policy)
    await routable(r, 2)
    for user in (None, None, "alice"):
        body = {**CHAT, "user": user} if user else CHAT
        async with http.post(r.url + "/v1/chat/completions", json=body,
                             headers={"X-Session-ID": ""}) as resp:
            assert resp.status == 200
    table = r.app[STATE].policy.sessions._table  # type: ignore[attr-defined]
    assert "" not in table
    assert "alice" in table
