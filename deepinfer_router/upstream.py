"""A lean HTTP/1.1 client for the proxy's hot path: keep-alive connection pools per engine
on raw asyncio Protocols, responses parsed by httptools (llhttp, the parser Node.js uses).

Hand-written on purpose, against the house rule of preferring a well-kept library,
because the hot path measurably needs it: aiohttp's ClientSession was about a quarter of
the router's CPU per proxied request (request and URL objects, connector bookkeeping,
timers, StreamReader, cookie and header machinery), and the router did no better than a
bare aiohttp forwarder. This client does per request: one pooled connection popped from a
list, one `transport.write` of the whole request, one httptools parse, one future for the
headers. On benchmarks/overhead.py (2-core VM, medians of 4 alternating runs) router
requests/s went from about 2,000-2,300 to 4,200-4,600 non-streaming and from about 2,150
to 4,200 streaming (kv-aware); least-conn, 5 interleaved pairs: 2,670 -> 4,780
non-streaming, 2,290 -> 4,520 streaming. The parsing itself stays in a library
(httptools, llhttp), only the connection handling is ours. Scrapes, health checks and
model listing keep aiohttp: they are not on the hot path.

What it does:
- pools: one LIFO stack of idle keep-alive connections per (scheme, host, port), no
  limit on their number (admission control bounds concurrency); an idle connection is
  closed after `idle_timeout_s` (below the engine's own keep-alive: vLLM closes idle
  connections after 5 s); a request on a reused connection that the engine closed
  before sending any byte is sent once more on a fresh connection; a connection goes
  back to the pool only when its response was received completely and the server
  allowed keep-alive;
- requests: `Content-Length` framing, `Host` set to the engine's host[:port], headers
  sent as given (no Accept, Accept-Encoding or User-Agent added), TCP_NODELAY;
- responses: status, headers as a case-preserving list (duplicates kept; at most
  MAX_HEAD_BYTES and MAX_HEADER_FIELDS, else a protocol error), body by Content-Length,
  chunked (trailers dropped) or until the server closes cleanly (a reset is an error);
  bytes after the end of the response, or a 101, are a protocol error and close the
  connection; bytes passed through as they come (no decompression); `read()` for the
  whole body, `readany()` / `async for` for streaming, with at most about
  `buffer_limit` bytes buffered (the socket's reading is paused beyond that and resumed
  once the caller drained it);
- https engines: TLS with the default SSL context (system CA store, hostname checked).

Timeouts are the caller's (`asyncio.timeout` around `request()` and each read), except
connecting: `connect_timeout_s`. Errors: `UpstreamConnectError` (refused, unreachable,
name not resolved, TLS handshake failed), `UpstreamConnectTimeout`, `UpstreamDisconnected`
(the server closed or reset the connection before the response was complete),
`UpstreamProtocolError` (not valid HTTP). A cancelled `request()` or read closes the
connection at once, so the engine sees its client leave and stops generating.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from typing import cast
from urllib.parse import urlsplit

import httptools

from .engine_address import GetAddrInfo, is_ip_literal, resolve_allowed

__all__ = [
    "UpstreamConnectError",
    "UpstreamConnectTimeout",
    "UpstreamDisconnected",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamProtocolError",
    "UpstreamResponse",
]


class UpstreamError(Exception):
    """Any failure of an upstream request (other than a timeout the caller enforces)."""


class UpstreamConnectError(UpstreamError):
    """The connection could not be made: refused, unreachable, unresolved, TLS failed."""


class UpstreamConnectTimeout(UpstreamError):
    """The connection was not made within the connect timeout."""


class UpstreamDisconnected(UpstreamError):
    """The server closed or reset the connection before its response was complete."""


class UpstreamProtocolError(UpstreamError):
    """The server's answer is not valid HTTP/1.1."""


_CONTENT_LENGTH = b"content-length"
_TRANSFER_ENCODING = b"transfer-encoding"
# Bounds on a response's head, as aiohttp's client has them: the bytes of its header names
# and values together, and the number of fields (informational responses and trailers
# count).
MAX_HEAD_BYTES = 65536
MAX_HEADER_FIELDS = 100
# httptools gathers a header field whole before handing it over: a head that never ends
# is cut off once this much arrived without the head being complete.
_MAX_BYTES_BEFORE_HEAD = 2 * MAX_HEAD_BYTES
_BODYLESS_METHODS = frozenset(("GET", "HEAD", "DELETE", "OPTIONS", "TRACE"))


class _Origin:
    """A parsed engine base URL."""

    __slots__ = ("host", "host_header", "is_name", "key", "port", "prefix", "tls")

    def __init__(self, base_url: str) -> None:
        parts = urlsplit(base_url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.tls = scheme == "https"
        self.host = parts.hostname
        default_port = 443 if self.tls else 80
        self.port = parts.port or default_port
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if self.port == default_port else f"{host}:{self.port}"
        self.prefix = parts.path.rstrip("/")
        self.key = (scheme, self.host, self.port)
        self.is_name = not is_ip_literal(self.host)


class UpstreamResponse:
    """The answer to one request: `status`, `headers`, then the body by `read()`,
    `readany()` or `async for`. `close()` (always call it, e.g. in `finally`) gives the
    connection back to its pool when the response was received completely, and closes
    it otherwise."""

    __slots__ = (
        "_buffer",
        "_buffered",
        "_conn",
        "_exc",
        "_waiter",
        "complete",
        "headers",
        "status",
    )

    def __init__(self, conn: _Connection) -> None:
        self._conn: _Connection | None = conn
        self.status = 0
        self.headers: list[tuple[str, str]] = []
        self._buffer: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self._exc: BaseException | None = None
        self.complete = False  # the whole body has been received (maybe not yet read)

    # --- for the caller -----------------------------------------------------------------
    def header(self, name: str, default: str = "") -> str:
        """The first header called `name` (any case), else `default`."""
        name = name.lower()
        for k, v in self.headers:
            if k.lower() == name:
                return v
        return default

    def at_eof(self) -> bool:
        """True when the body has been received completely and read entirely."""
        return self.complete and not self._buffer

    async def readany(self) -> bytes:
        """What has arrived of the body since the last read, waiting for at least one
        byte; b"" at the end of the body. Raises UpstreamError when the body broke off
        (after what arrived before has been read)."""
        while not self._buffer:
            if self.complete:
                return b""
            if self._exc is not None:
                raise self._exc
            await self._wait()
        return self._take()

    def read_nowait(self) -> bytes:
        """What has arrived of the body and not been read yet, without waiting (b"" when
        nothing has)."""
        return self._take()

    def _take(self) -> bytes:
        buffer = self._buffer
        if not buffer:
            return b""
        data = buffer.popleft() if len(buffer) == 1 else b"".join(buffer)
        buffer.clear()
        self._buffered = 0
        conn = self._conn
        if conn is not None and conn.reading_paused:
            conn.resume()
        return data

    async def read_prefix(self, limit: int, into: list[bytes] | None = None) -> bytes:
        """At least `limit` bytes of the rest of the body, or the rest when shorter (may
        return more than `limit`: whatever had arrived). The chunks are also appended to
        `into`, which keeps what was read when a timeout or an error interrupts this."""
        chunks = [] if into is None else into
        size = 0
        while size < limit and (chunk := await self.readany()):
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)

    async def read(self) -> bytes:
        """The rest of the body."""
        if self.complete:  # usual for a small answer: it came with the headers
            return self._take()
        chunks = []
        while chunk := await self.readany():
            chunks.append(chunk)
        return b"".join(chunks)

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        while chunk := await self.readany():
            yield chunk

    def close(self) -> None:
        """Done with this response: pool the connection if the response is complete and
        the server keeps the connection alive, close it otherwise. Idempotent."""
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        conn.response_done(self)

    async def _wait(self) -> None:
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        except asyncio.CancelledError:
            self.close_connection()
            raise
        finally:
            self._waiter = None

    def close_connection(self) -> None:
        """Close the connection now, whatever the state of the response."""
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.abort()

    # --- from the connection ------------------------------------------------------------
    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: BaseException) -> None:
        if self._exc is None:
            self._exc = exc
        self._wake()


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an engine, parsing the responses it receives."""

    def __init__(self, pool: UpstreamPool, key: tuple[str, str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.response: UpstreamResponse | None = None
        self.headers_waiter: asyncio.Future[UpstreamResponse] | None = None
        self.closed = False
        self.reading_paused = False
        self.keep_alive = False
        self.head_only = False  # the request was HEAD: the response has no body
        self.framed = False  # the response has Content-Length or is chunked
        self.head_bytes = 0  # header names and values so far (trailers included)
        self.bytes_before_head = 0  # received while waiting for the response's headers
        self.header_fields = 0
        self.headers_done = False  # of the final response: later fields are trailers
        self.message_done = False  # the final response ended: more bytes are a fault
        self.received = False  # any byte of the current response arrived
        self.idle_since = 0.0
        self.buffer_limit = pool.buffer_limit

    # --- asyncio.Protocol -----------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's: not a subclass
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError, AttributeError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        response = self.response
        if response is None or response.complete:  # unasked: a server must not send that
            self.abort()
            return
        self.received = True
        if self.headers_waiter is not None:
            self.bytes_before_head += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:  # raised by a callback below
            cause = exc.__context__
            self._broken(
                cause if isinstance(cause, UpstreamError)
                else UpstreamProtocolError(f"invalid HTTP response from engine: {exc}")
            )
            return
        except httptools.HttpParserError as exc:
            self._broken(UpstreamProtocolError(f"invalid HTTP response from engine: {exc}"))
            return
        except httptools.HttpParserUpgrade:
            self._broken(UpstreamProtocolError("engine switched protocols (status 101)"))
            return
        if self.headers_waiter is not None and self.bytes_before_head > _MAX_BYTES_BEFORE_HEAD:
            self._broken(UpstreamProtocolError(
                f"engine response headers larger than {MAX_HEAD_BYTES} bytes"
            ))

    def eof_received(self) -> bool | None:
        return False  # a half-closed connection is of no further use: close it

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool._forget(self)
        response = self.response
        if response is None:
            return
        if (
            exc is None
            and self.headers_waiter is None
            and not response.complete
            and not self.framed
            and response._exc is None
        ):
            # A body without Content-Length or chunking ends when the server closes the
            # connection cleanly (a reset is a failure, not the end).
            self.on_message_complete()
            return
        reason = f": {exc}" if exc else ""
        if self.headers_waiter is not None:
            message = f"engine closed the connection before answering{reason}"
        else:
            message = f"engine closed the connection mid-body{reason}"
        self._broken(UpstreamDisconnected(message))

    def pause_writing(self) -> None:  # request bodies are written at once, never paced
        pass

    def resume_writing(self) -> None:
        pass

    # --- httptools callbacks ------------------------------------------------------------
    def on_message_begin(self) -> None:
        if self.message_done:
            # A second response on a connection that was asked one question: its bytes
            # must not be read as part of the first. The first is suspect too.
            assert self.response is not None
            self.response.complete = False
            raise UpstreamProtocolError("engine sent data after the end of its response")

    def on_header(self, name: bytes, value: bytes) -> None:
        response = self.response
        assert response is not None
        fields = self.header_fields = self.header_fields + 1
        size = self.head_bytes = self.head_bytes + len(name) + len(value)
        if fields > MAX_HEADER_FIELDS or size > MAX_HEAD_BYTES:
            raise UpstreamProtocolError(
                f"engine response has more than {MAX_HEADER_FIELDS} header fields"
                if fields > MAX_HEADER_FIELDS
                else f"engine response headers larger than {MAX_HEAD_BYTES} bytes"
            )
        if self.headers_done:  # a chunked body's trailer: not relayed as a header
            return
        if len(name) in (14, 17):
            lname = name.lower()
            if lname == _CONTENT_LENGTH:
                self.framed = True
            elif lname == _TRANSFER_ENCODING:
                # Framed only when chunked is the last coding; any other (identity...)
                # means the body runs until the server closes (RFC 9112 6.3).
                self.framed = value.rsplit(b",", 1)[-1].strip().lower() == b"chunked"
        response.headers.append(
            (name.decode("utf-8", "surrogateescape"), value.decode("utf-8", "surrogateescape"))
        )

    def on_headers_complete(self) -> None:
        response = self.response
        assert response is not None
        status = self.parser.get_status_code()
        if 100 <= status < 200:  # informational (103 Early Hints, ...): the answer follows
            response.headers = []
            self.framed = False
            return
        response.status = status
        self.headers_done = True
        self.keep_alive = self.parser.should_keep_alive()
        waiter = self.headers_waiter
        self.headers_waiter = None
        if self.head_only or status in (204, 304):
            self.framed = True
            if self.head_only:  # llhttp would wait for a body: answer now, never reuse
                self.keep_alive = False
                response.complete = True
        if waiter is not None and not waiter.done():
            waiter.set_result(response)

    def on_body(self, body: bytes) -> None:
        response = self.response
        assert response is not None
        response._buffer.append(body)
        response._buffered += len(body)
        if response._buffered > self.buffer_limit and not self.reading_paused:
            assert self.transport is not None
            self.reading_paused = True
            self.transport.pause_reading()
        if response._waiter is not None:
            response._wake()

    def on_message_complete(self) -> None:
        response = self.response
        assert response is not None
        if response.status == 0:  # the end of an informational response
            return
        self.message_done = True
        response.complete = True
        response._wake()

    # --- for the pool and the response --------------------------------------------------
    def send(self, data: bytes, body: bytes, head_only: bool) -> asyncio.Future[UpstreamResponse]:
        assert self.transport is not None
        response = UpstreamResponse(self)
        self.response = response
        self.head_only = head_only
        self.framed = False
        self.keep_alive = False
        self.head_bytes = self.bytes_before_head = self.header_fields = 0
        self.headers_done = self.message_done = self.received = False
        waiter = self.headers_waiter = self.pool.loop.create_future()
        if body and len(body) > 65536:  # no copy of a large body just to join it
            self.transport.write(data)
            self.transport.write(body)
        else:
            self.transport.write(data + body if body else data)
        return waiter

    def resume(self) -> None:
        self.reading_paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def response_done(self, response: UpstreamResponse) -> None:
        if self.response is not response:
            return
        if response.complete and self.keep_alive and not self.closed:
            self.response = None
            if self.reading_paused:
                self.resume()
            self.pool._release(self)
        elif not response.complete:
            self.abort()
        # complete but not keep-alive: the server closes; close our side too
        else:
            self.abort()

    def abort(self) -> None:
        """Close the connection now (FIN; RST when unsent data is left)."""
        if self.closed:
            return
        self.closed = True
        self.pool._forget(self)
        transport = self.transport
        if transport is not None:
            if transport.get_write_buffer_size():
                transport.abort()
            else:
                transport.close()
        response = self.response
        if response is not None and not response.complete:
            self._broken(UpstreamDisconnected("connection closed by the router"))

    def _broken(self, exc: UpstreamError) -> None:
        waiter = self.headers_waiter
        if waiter is not None:
            self.headers_waiter = None
            if not waiter.done():
                waiter.set_exception(exc)
        response = self.response
        if response is not None:
            response._fail(exc)
        if not self.closed:
            self.abort()


def _expire(waiter: asyncio.Future[UpstreamResponse]) -> None:
    if not waiter.done():
        waiter.set_exception(TimeoutError())


class UpstreamPool:
    """Keep-alive connections to engines, by origin. Hangs off RouterState; `close()` at
    shutdown."""

    def __init__(
        self,
        *,
        connect_timeout_s: float = 5.0,
        idle_timeout_s: float = 4.0,
        buffer_limit: int = 1 << 20,
        ssl_context: ssl.SSLContext | None = None,
        guard_addresses: bool = True,
        getaddrinfo: GetAddrInfo | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        # Names are resolved here and each address checked before connecting (see
        # engine_address): a name re-pointed at a metadata address after registration
        # is refused. False: --allow-private-engine-urls.
        self.guard_addresses = guard_addresses
        self._getaddrinfo = getaddrinfo  # None: the loop's
        self.connect_timeout_s = connect_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.buffer_limit = buffer_limit
        self._ssl_context = ssl_context
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._origins: dict[str, _Origin] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    def _origin(self, base_url: str) -> _Origin:
        origin = self._origins.get(base_url)
        if origin is None:
            if len(self._origins) >= 4096:  # engines come and go: bound the cache
                self._origins.clear()
            origin = self._origins[base_url] = _Origin(base_url)
        return origin

    async def request(
        self,
        method: str,
        base_url: str,
        path: str,
        headers: dict[str, str] | Iterable[tuple[str, str]],
        body: bytes = b"",
        head_by: float | None = None,
    ) -> UpstreamResponse:
        """Send `method base_url+path` and wait for the response's status and headers.
        `path` starts with "/" and may carry a query string. `head_by` (time.monotonic()):
        raise TimeoutError if the head has not come by then (connecting included)."""
        if self._closed:
            raise UpstreamError("upstream pool is closed")
        origin = self._origin(base_url)
        items = headers.items() if isinstance(headers, dict) else headers
        lines = [f"{method} {origin.prefix}{path} HTTP/1.1\r\nHost: {origin.host_header}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in items]
        if body or method not in _BODYLESS_METHODS:
            lines.append(f"Content-Length: {len(body)}\r\n")
        lines.append("\r\n")
        head = "".join(lines)
        if head.count("\n") != len(lines) + 1 or head.count("\r") != len(lines) + 1:
            raise ValueError("CR or LF in a request header or path")  # header injection
        data = head.encode("utf-8", "surrogateescape")
        conn = self._acquire(origin.key)
        reused = conn is not None
        while True:  # at most twice: a reused connection, then a fresh one
            if conn is None:
                conn = await self._connect(origin, head_by)
            waiter = conn.send(data, body, method == "HEAD")
            # A timer on the future rather than asyncio.timeout(): no task lookup or
            # context manager per request (measurable on the hot path).
            timer = (
                None
                if head_by is None
                else self.loop.call_later(head_by - time.monotonic(), _expire, waiter)
            )
            try:
                return await waiter
            except UpstreamDisconnected:
                conn.abort()
                if not reused or conn.received:
                    raise
                # A kept-alive connection the engine closed while it was idle (the race
                # every keep-alive client has): once more, on a fresh connection.
                conn, reused = None, False
            except BaseException:  # cancelled (client left, timeout) or failed: drop it
                conn.abort()
                raise
            finally:
                if timer is not None:
                    timer.cancel()

    async def _open(self, origin: _Origin, ssl_context: ssl.SSLContext | None) -> _Connection:
        server_hostname = origin.host if ssl_context is not None else None
        if not (origin.is_name and self.guard_addresses):
            _, protocol = await self.loop.create_connection(
                lambda: _Connection(self, origin.key), origin.host, origin.port,
                ssl=ssl_context, server_hostname=server_hostname,
            )
            return protocol
        error: OSError | None = None
        for address in await resolve_allowed(origin.host, origin.port, self._getaddrinfo):
            try:
                _, protocol = await self.loop.create_connection(
                    lambda: _Connection(self, origin.key), address, origin.port,
                    ssl=ssl_context, server_hostname=server_hostname,
                )
                return protocol
            except OSError as exc:  # the next address, like create_connection would
                error = exc
        assert error is not None
        raise error

    def _acquire(self, key: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        too_old = time.monotonic() - self.idle_timeout_s
        while idle:
            conn = idle.pop()
            if conn.idle_since <= too_old:  # the engine may be closing it right now
                conn.abort()
                continue
            if not conn.closed and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    async def _connect(self, origin: _Origin, head_by: float | None = None) -> _Connection:
        limit = self.connect_timeout_s
        head_first = head_by is not None and head_by - time.monotonic() < limit
        if head_first:
            assert head_by is not None
            limit = head_by - time.monotonic()
        ssl_context: ssl.SSLContext | None = None
        if origin.tls:
            if self._ssl_context is None:
                self._ssl_context = ssl.create_default_context()
            ssl_context = self._ssl_context
        try:
            async with asyncio.timeout(limit):
                protocol = await self._open(origin, ssl_context)
        except TimeoutError:
            if head_first:  # the caller's deadline, not the connect timeout
                raise
            raise UpstreamConnectTimeout(
                f"no connection to {origin.host_header} within {self.connect_timeout_s:g}s"
            ) from None
        except OSError as exc:  # refused, unreachable, unresolved, TLS handshake
            raise UpstreamConnectError(
                f"cannot connect to {origin.host_header}: {exc}"
            ) from None
        conn = protocol
        if self._closed:
            conn.abort()
            raise UpstreamError("upstream pool is closed")
        self._all.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        if self._closed:
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        idle = self._idle.get(conn.key)
        if idle is None:
            idle = self._idle[conn.key] = []
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self.loop.call_later(self.idle_timeout_s / 2, self._sweep)

    def _forget(self, conn: _Connection) -> None:
        self._all.discard(conn)

    def _sweep(self) -> None:
        """Close connections idle longer than the idle timeout (the oldest are at the
        bottom of each LIFO stack)."""
        self._sweeper = None
        too_old = time.monotonic() - self.idle_timeout_s
        for key, idle in list(self._idle.items()):
            n = 0
            while n < len(idle) and (idle[n].idle_since <= too_old or idle[n].closed):
                idle[n].abort()
                n += 1
            if n:
                del idle[:n]
            if not idle:
                del self._idle[key]
        if self._idle and not self._closed:
            self._sweeper = self.loop.call_later(self.idle_timeout_s / 2, self._sweep)

    def idle_connections(self) -> int:
        return sum(1 for idle in self._idle.values() for c in idle if not c.closed)

    def open_connections(self) -> int:
        return len(self._all)

    async def close(self) -> None:
        """Close every connection, idle or in use."""
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for conn in list(self._all):
            conn.abort()
        self._all.clear()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports close
