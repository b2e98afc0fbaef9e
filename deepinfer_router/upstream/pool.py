"""Keep-alive connection pools per engine origin: connect (with address checks), send,
wait for the head, reuse or close."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Iterable
from urllib.parse import urlsplit

from ..engine_address import GetAddrInfo, is_ip_literal, resolve_allowed
from .connection import Connection
from .errors import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamDisconnected,
    UpstreamError,
)
from .response import UpstreamResponse

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
        self._idle: dict[tuple[str, str, int], list[Connection]] = {}
        self._all: set[Connection] = set()
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

    async def _open(self, origin: _Origin, ssl_context: ssl.SSLContext | None) -> Connection:
        server_hostname = origin.host if ssl_context is not None else None
        if not (origin.is_name and self.guard_addresses):
            _, protocol = await self.loop.create_connection(
                lambda: Connection(self, origin.key), origin.host, origin.port,
                ssl=ssl_context, server_hostname=server_hostname,
            )
            return protocol
        error: OSError | None = None
        for address in await resolve_allowed(origin.host, origin.port, self._getaddrinfo):
            try:
                _, protocol = await self.loop.create_connection(
                    lambda: Connection(self, origin.key), address, origin.port,
                    ssl=ssl_context, server_hostname=server_hostname,
                )
                return protocol
            except OSError as exc:  # the next address, like create_connection would
                error = exc
        assert error is not None
        raise error

    def _acquire(self, key: tuple[str, str, int]) -> Connection | None:
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

    async def _connect(self, origin: _Origin, head_by: float | None = None) -> Connection:
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

    def _release(self, conn: Connection) -> None:
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

    def _forget(self, conn: Connection) -> None:
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
