"""One keep-alive connection to an engine: an asyncio Protocol feeding httptools (llhttp)
and filling in the current UpstreamResponse. Bounds on a response's head, framing, and
what ends a connection are here."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import TYPE_CHECKING, cast

import httptools

from .errors import UpstreamDisconnected, UpstreamError, UpstreamProtocolError
from .response import UpstreamResponse

if TYPE_CHECKING:  # the pool creates connections; a connection only calls back
    from .pool import UpstreamPool

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


class Connection(asyncio.Protocol):
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
