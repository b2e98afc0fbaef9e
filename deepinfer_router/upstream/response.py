"""The answer to one upstream request, as the connection fills it in."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the connection creates responses; a response only calls back
    from .connection import Connection


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

    def __init__(self, conn: Connection) -> None:
        self._conn: Connection | None = conn
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
