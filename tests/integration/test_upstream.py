"""deepinfer_router.upstream (the proxy's HTTP/1.1 client) against real servers on
127.0.0.1: aiohttp servers, and raw asyncio servers where a behaviour is one aiohttp will
not produce (a body that ends when the server closes, a reset before the headers)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from deepinfer_router.upstream import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamPool,
    UpstreamProtocolError,
)
from tests.support.echo_engine import RunningServer
from tests.support.raw_engine import raw_server, read_request_head
from tests.support.waiting import wait_until

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@pytest.fixture
def serve(
    serve_app: Callable[[web.Application], Awaitable[RunningServer]],
) -> Callable[..., Awaitable[RunningServer]]:
    """Serve a test app made of the given route handlers."""

    async def start(routes: dict[str, Handler]) -> RunningServer:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        for path, handler in routes.items():
            app.router.add_route("*", path, handler)
        return await serve_app(app)

    return start


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    p = UpstreamPool(connect_timeout_s=2.0)
    yield p
    await p.close()


def peer_port(request: web.Request) -> int:
    transport = request.transport
    assert transport is not None
    return transport.get_extra_info("peername")[1]


# --- bodies ---------------------------------------------------------------------------


async def test_content_length_body_headers_and_what_is_sent(serve, pool):
    seen: dict[str, Any] = {}

    async def echo(request: web.Request) -> web.Response:
        seen["headers"] = list(request.raw_headers)
        seen["body"] = await request.read()
        seen["path_qs"] = request.path_qs
        resp = web.Response(body=b'{"ok":true}', content_type="application/json")
        resp.headers.add("Set-Cookie", "a=1")
        resp.headers.add("Set-Cookie", "b=2")
        resp.headers["X-Mixed-Case"] = "Yes"
        return resp

    s = await serve({"/v1/chat/completions": echo})
    body = b'{"model":"m","messages":[]}'
    resp = await pool.request(
        "POST", s.url, "/v1/chat/completions?x=1",
        {"Content-Type": "application/json", "X-Request-Id": "r1"}, body,
    )
    assert resp.status == 200
    assert resp.header("content-type") == "application/json"
    assert [v for k, v in resp.headers if k == "Set-Cookie"] == ["a=1", "b=2"]
    assert ("X-Mixed-Case", "Yes") in resp.headers  # case preserved
    assert await resp.read() == b'{"ok":true}'
    assert resp.at_eof()
    resp.close()
    assert seen["body"] == body
    assert seen["path_qs"] == "/v1/chat/completions?x=1"
    sent = {k.decode().lower(): v.decode() for k, v in seen["headers"]}
    assert sent["host"] == s.url.removeprefix("http://")
    assert sent["content-length"] == str(len(body))
    assert sent["x-request-id"] == "r1"
    # Nothing added that the caller did not send (no Accept-Encoding: bytes pass through).
    assert set(sent) == {"host", "content-type", "x-request-id", "content-length"}


async def test_base_url_path_prefix_and_bodyless_get(serve, pool):
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=f"{request.method} {request.path} {request.content_length}")

    s = await serve({"/{tail:.*}": handler})
    resp = await pool.request("GET", s.url + "/prefix/", "/v1/models", {})
    assert await resp.read() == b"GET /prefix/v1/models None"
    resp.close()


async def test_chunked_stream_arrives_chunk_by_chunk(serve, pool):
    go_on = asyncio.Event()

    async def sse(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        await resp.write(b"data: 1\n\n")
        await go_on.wait()  # the client must see the first event before this one exists
        await resp.write(b"data: 2\n\n")
        await resp.write_eof()
        return resp

    s = await serve({"/s": sse})
    resp = await pool.request("POST", s.url, "/s", {}, b"{}")
    assert resp.status == 200
    assert ("Transfer-Encoding", "chunked") in resp.headers
    first = await asyncio.wait_for(resp.readany(), 5)
    assert first == b"data: 1\n\n"
    assert not resp.at_eof()
    assert resp.read_nowait() == b""  # nothing more yet, and no waiting for it
    go_on.set()
    rest = [chunk async for chunk in resp]
    assert b"".join(rest) == b"data: 2\n\n"
    assert resp.at_eof()
    resp.close()
    assert pool.idle_connections() == 1  # complete and keep-alive: pooled


async def test_body_until_close(pool):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
        writer.write(b"part one, ")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"part two")
        await writer.drain()
        writer.close()

    async with raw_server(handle) as url:
        resp = await pool.request("POST", url, "/", {}, b"x")
        assert await resp.read() == b"part one, part two"
        resp.close()
    assert pool.idle_connections() == 0
    await wait_until(lambda: pool.open_connections() == 0, timeout=2)


async def test_no_content_status_and_informational_response(pool):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
        writer.write(b"HTTP/1.1 204 No Content\r\nX-A: 1\r\n\r\n")
        await writer.drain()
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()  # until the client closes
        writer.close()

    async with raw_server(handle) as url:
        resp = await pool.request("POST", url, "/", {}, b"x")
        assert resp.status == 204
        assert resp.headers == [("X-A", "1")]
        assert await resp.read() == b""
        resp.close()
        resp = await pool.request("POST", url, "/", {}, b"x")  # same connection
        assert await resp.read() == b"ok"
        resp.close()
        assert pool.open_connections() == 1


# --- the pool -------------------------------------------------------------------------


async def test_keep_alive_reuse_lifo_and_idle_timeout(serve):
    ports: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        ports.append(peer_port(request))
        return web.Response(text="ok")

    s = await serve({"/": handler})
    p = UpstreamPool(idle_timeout_s=0.3)
    try:
        for _ in range(3):
            resp = await p.request("POST", s.url, "/", {}, b"x")
            assert await resp.read() == b"ok"
            resp.close()
        assert len(set(ports)) == 1  # one connection, reused
        # Two at once need two connections; both are pooled, the last released is reused.
        r1 = await p.request("POST", s.url, "/", {}, b"x")
        r2 = await p.request("POST", s.url, "/", {}, b"x")
        assert len(set(ports)) == 2
        await r1.read()
        await r2.read()
        r1.close()
        r2.close()
        assert p.idle_connections() == 2
        resp = await p.request("POST", s.url, "/", {}, b"x")
        assert ports[-1] == ports[-2]  # LIFO: the most recently used one
        resp.close()
        await wait_until(lambda: p.open_connections() == 0, timeout=3)  # idle timeout
        assert p.idle_connections() == 0
    finally:
        await p.close()


async def test_connection_close_from_server_is_not_reused(serve, pool):
    ports: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        ports.append(peer_port(request))
        resp = web.Response(text="bye")
        resp.force_close()
        return resp

    s = await serve({"/": handler})
    for _ in range(2):
        resp = await pool.request("POST", s.url, "/", {}, b"x")
        assert ("Connection", "close") in resp.headers
        assert await resp.read() == b"bye"
        resp.close()
    assert len(set(ports)) == 2
    assert pool.idle_connections() == 0


async def test_response_not_read_to_the_end_is_not_reused(serve, pool):
    ports: list[int] = []
    server_saw_disconnect = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        ports.append(peer_port(request))
        resp = web.StreamResponse()
        await resp.prepare(request)
        try:
            await resp.write(b"a" * 100)
            await asyncio.sleep(10)
        except (asyncio.CancelledError, ConnectionResetError):
            server_saw_disconnect.set()
            raise
        return resp

    s = await serve({"/": handler})
    resp = await pool.request("POST", s.url, "/", {}, b"x")
    await resp.readany()
    resp.close()  # not complete: the connection is closed, never pooled
    await asyncio.wait_for(server_saw_disconnect.wait(), 5)
    assert pool.idle_connections() == 0
    assert pool.open_connections() == 0


async def test_stale_pooled_connection_is_skipped(serve, pool):
    ports: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        ports.append(peer_port(request))
        return web.Response(text="ok")

    s = await serve({"/": handler})
    resp = await pool.request("POST", s.url, "/", {}, b"x")
    await resp.read()
    resp.close()
    await s.close()  # closes the idle keep-alive connection
    await wait_until(lambda: pool.open_connections() == 0, timeout=3)
    s2 = await serve({"/": handler})
    resp = await pool.request("POST", s2.url, "/", {}, b"x")
    assert await resp.read() == b"ok"
    resp.close()


# --- failures ---------------------------------------------------------------------------


async def test_connect_refused(pool):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        with pytest.raises(UpstreamConnectError):
            await pool.request("POST", f"http://127.0.0.1:{port}", "/", {}, b"x")


async def test_connect_timeout():
    class SlowLoop:
        """The running loop, except that connecting never completes."""

        def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
            self._loop = loop

        def __getattr__(self, name: str) -> Any:
            return getattr(self._loop, name)

        async def create_connection(self, *args: Any, **kwargs: Any) -> Any:
            await asyncio.sleep(10)

    p = UpstreamPool(connect_timeout_s=0.1)
    p.loop = SlowLoop(p.loop)  # type: ignore[assignment]
    try:
        with pytest.raises(UpstreamConnectTimeout):
            await p.request("POST", "http://127.0.0.1:9", "/", {}, b"x")
    finally:
        await p.close()


async def test_closed_before_headers_and_reset_mid_body(pool):
    async def close_at_once(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.close()

    async with raw_server(close_at_once) as url:
        with pytest.raises(UpstreamDisconnected):
            await pool.request("POST", url, "/", {}, b"x")

    async def reset_mid_body(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"a" * 100)
        await writer.drain()
        await asyncio.sleep(0.05)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        writer.transport.abort()  # RST

    async with raw_server(reset_mid_body) as url:
        resp = await pool.request("POST", url, "/", {}, b"x")
        assert resp.status == 200
        assert await resp.readany() == b"a" * 100  # what arrived is delivered first
        with pytest.raises(UpstreamDisconnected):
            await resp.readany()
        resp.close()
        resp = await pool.request("POST", url, "/", {}, b"x")
        with pytest.raises(UpstreamDisconnected):
            await resp.read()
        resp.close()
    assert pool.open_connections() == 0


async def test_aiohttp_server_dropping_the_connection_mid_stream(serve, pool):
    async def handler(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(b"data: 1\n\n")
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()
        return resp

    s = await serve({"/": handler})
    resp = await pool.request("POST", s.url, "/", {}, b"x")
    assert await resp.readany() == b"data: 1\n\n"
    with pytest.raises(UpstreamDisconnected):
        await resp.readany()
    resp.close()


async def test_invalid_http_is_a_protocol_error(pool):
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request_head(reader)
        writer.write(b"SMTP ready\r\n\r\n")
        await writer.drain()
        await reader.read()
        writer.close()

    async with raw_server(handle) as url:
        with pytest.raises(UpstreamProtocolError):
            await pool.request("POST", url, "/", {}, b"x")
    assert pool.open_connections() == 0


async def test_header_injection_refused(pool):
    with pytest.raises(ValueError):
        await pool.request("POST", "http://127.0.0.1:9", "/", {"X-A": "1\r\nX-B: 2"}, b"")
    with pytest.raises(ValueError):
        await pool.request("POST", "http://127.0.0.1:9", "/a b HTTP/1.1\r\nX: y", {}, b"")


async def test_closed_pool_refuses(pool):
    await pool.close()
    with pytest.raises(UpstreamError):
        await pool.request("POST", "http://127.0.0.1:9", "/", {}, b"")


# --- cancellation ---------------------------------------------------------------------


@pytest.mark.parametrize("when", ["headers", "body"])
async def test_cancellation_closes_the_connection_at_once(serve, pool, when):
    server_saw_disconnect = asyncio.Event()
    started = asyncio.Event()

    async def handler(request: web.Request) -> web.StreamResponse:
        started.set()
        try:
            if when == "headers":
                await asyncio.sleep(30)
            resp = web.StreamResponse()
            await resp.prepare(request)
            await resp.write(b"first")
            await asyncio.sleep(30)
        except asyncio.CancelledError:  # handler_cancellation: the client left
            server_saw_disconnect.set()
            raise
        return resp

    s = await serve({"/": handler})

    async def client() -> None:
        resp = await pool.request("POST", s.url, "/", {}, b"x")
        try:
            assert await resp.readany() == b"first"
            await resp.readany()  # cancelled here
        finally:
            resp.close()

    task = asyncio.create_task(client())
    await asyncio.wait_for(started.wait(), 5)
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.wait_for(server_saw_disconnect.wait(), 2)
    assert pool.open_connections() == 0


# --- big bodies and flow control --------------------------------------------------------


async def test_big_bodies_with_flow_control(serve):
    size = 8 * 1024 * 1024
    block = bytes(range(256)) * 256  # 64 KiB

    async def upload(request: web.Request) -> web.Response:
        data = await request.read()
        return web.Response(text=str(len(data)))

    async def download(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for _ in range(size // len(block)):
            await resp.write(block)
        await resp.write_eof()
        return resp

    s = await serve({"/up": upload, "/down": download})
    limit = 256 * 1024
    p = UpstreamPool(buffer_limit=limit)
    try:
        resp = await p.request("POST", s.url, "/up", {}, block * (size // len(block)))
        assert await resp.read() == str(size).encode()
        resp.close()

        resp = await p.request("POST", s.url, "/down", {}, b"x")
        received: list[bytes] = []
        most_buffered = 0
        paused = 0
        while True:
            await asyncio.sleep(0.002)  # a slow reader: the socket must be paused
            most_buffered = max(most_buffered, resp._buffered)
            conn = resp._conn
            paused += bool(conn is not None and conn.reading_paused)
            chunk = await resp.readany()
            if not chunk:
                break
            received.append(chunk)
        # Every byte, in order, through pauses and resumes.
        assert b"".join(received) == block * (size // len(block))
        assert paused > 0
        # Bounded: the limit plus at most one socket read beyond it.
        assert most_buffered <= limit + 512 * 1024
        resp.close()
        assert p.idle_connections() == 1

        resp = await p.request("POST", s.url, "/down", {}, b"x")
        body = await resp.read()  # read() drains through the same flow control
        assert body == block * (size // len(block))
        resp.close()
    finally:
        await p.close()


# --- https ----------------------------------------------------------------------------


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True,
    )
    return cert, key


async def test_https_engine(self_signed: tuple[Path, Path], pool):
    cert, key = self_signed
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=f"secure {request.secure}")

    app = web.Application()
    app.router.add_post("/", handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        # The default context does not trust a self-signed certificate.
        with pytest.raises(UpstreamConnectError):
            await pool.request("POST", f"https://localhost:{port}", "/", {}, b"x")
        client_ctx = ssl.create_default_context(cafile=str(cert))
        p = UpstreamPool(ssl_context=client_ctx)
        try:
            resp = await p.request("POST", f"https://localhost:{port}", "/", {}, b"x")
            assert await resp.read() == b"secure True"
            resp.close()
        finally:
            await p.close()
    finally:
        await runner.cleanup()


# --- on uvloop, as in the router ------------------------------------------------------


def test_on_uvloop() -> None:
    """The tests above run on asyncio's loop; the router runs on uvloop, whose transports
    are other classes: the essentials once more there."""
    import uvloop  # a declared dependency: never skipped

    async def scenario() -> None:
        gate = asyncio.Event()
        left = asyncio.Event()
        ports: list[int] = []

        async def plain(request: web.Request) -> web.Response:
            ports.append(peer_port(request))
            return web.Response(body=await request.read())

        async def stream(request: web.Request) -> web.StreamResponse:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await resp.write(b"data: 1\n\n")
            try:
                await gate.wait()
                await resp.write(b"x" * (4 * 1024 * 1024))
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                left.set()
                raise
            return resp

        app = web.Application()
        app.router.add_post("/plain", plain)
        app.router.add_post("/stream", stream)
        server = await RunningServer(app).start()
        p = UpstreamPool(buffer_limit=128 * 1024)
        try:
            for i in range(3):
                resp = await p.request("POST", server.url, "/plain", {}, b"body%d" % i)
                assert resp.status == 200
                assert await resp.read() == b"body%d" % i
                resp.close()
            assert len(set(ports)) == 1

            checked = asyncio.Event()

            async def client() -> None:
                resp = await p.request("POST", server.url, "/stream", {}, b"x")
                try:
                    assert await resp.readany() == b"data: 1\n\n"
                    gate.set()
                    conn = resp._conn
                    assert conn is not None
                    # 4 MiB on their way, at most ~128 KiB buffered: reading pauses.
                    await wait_until(lambda: conn.reading_paused, timeout=5)
                    assert resp._buffered < 1024 * 1024
                    checked.set()
                    while await resp.readany():  # the stream never ends: cancelled here
                        pass
                finally:
                    resp.close()

            task = asyncio.create_task(client())
            checked_wait = asyncio.create_task(checked.wait())
            await asyncio.wait({task, checked_wait}, timeout=10,
                               return_when=asyncio.FIRST_COMPLETED)
            checked_wait.cancel()
            if task.done():
                task.result()  # the client's failed assertion, if any
            assert checked.is_set() and not task.done()
            task.cancel()  # mid-body
            with pytest.raises(asyncio.CancelledError):
                await task
            await asyncio.wait_for(left.wait(), 2)
            assert p.open_connections() == 0  # the stream reused the pooled connection

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
                with pytest.raises(UpstreamConnectError):
                    await p.request("POST", f"http://127.0.0.1:{port}", "/", {}, b"x")
        finally:
            await p.close()
            await server.close()

    uvloop.run(scenario())
