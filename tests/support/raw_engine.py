"""Raw asyncio servers on 127.0.0.1 that write exact bytes: for HTTP behaviours a real
server (aiohttp, vLLM) will not produce, such as framing faults, oversized heads or a
connection reset mid-body. `raw_server` runs one handler per connection; `raw_engine`
puts such a handler behind the routes a router polls (`/health`, `/v1/models`,
`/metrics`), so that a router takes it for an engine."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
# The connection, and the head of a request that is not one of the polled GET routes
# (its body, by Content-Length, already read).
Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter, bytes], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(handle: Handler) -> AsyncIterator[str]:
    """Serve `handle` on a free loopback port; yields the server's URL. Each connection is
    closed when its handler returns; a handler that fails because the peer left (reset,
    EOF mid-read) ends quietly. On exit the handlers still running are cancelled and
    waited for, so none outlives the test."""
    tasks: set[asyncio.Task[None]] = set()

    async def run(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        try:
            await handle(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client left: nothing to answer
        except asyncio.CancelledError:
            pass  # cancelled below, at exit: end quietly, not as a failed callback
        finally:
            tasks.discard(task)
            writer.close()

    server = await asyncio.start_server(run, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.close()
        pending = list(tasks)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=2)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)


async def read_request_head(reader: asyncio.StreamReader) -> bytes:
    """A request's head; its body (by Content-Length) is read and dropped."""
    head = await reader.readuntil(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            await reader.readexactly(int(line.split(b":")[1]))
    return head


def reset(writer: asyncio.StreamWriter) -> None:
    """End the connection with a TCP RST instead of a FIN (SO_LINGER 0, then close)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.close()


def http_response(status: str, body: bytes, content_type: str = "application/json") -> bytes:
    """A complete response with Content-Length and `Connection: close`."""
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body


@contextlib.asynccontextmanager
async def raw_engine(answer: Answer, model: str = "m1") -> AsyncIterator[str]:
    """An engine a router accepts (it answers `/health`, `/v1/models` and `/metrics` as
    vLLM does, each on a connection closed after it) whose every other request goes to
    `answer`, with the connection; the connection is closed when `answer` returns (an
    `answer` that keeps the connection alive reads the next requests itself). Yields the
    engine's URL."""
    models = orjson.dumps({
        "object": "list",
        "data": [{"id": model, "object": "model", "owned_by": "vllm", "max_model_len": 4096}],
    })
    metrics = (
        "# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{model_name="{model}"}} 0\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        f'vllm:num_requests_waiting{{model_name="{model}"}} 0\n'
    ).encode()
    polled = {
        b"/health": http_response("200 OK", b"", "text/plain"),
        b"/v1/models": http_response("200 OK", models),
        b"/metrics": http_response("200 OK", metrics, "text/plain"),
    }

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await read_request_head(reader)
        method, path = head.split(b" ", 2)[:2]
        if method == b"GET":
            writer.write(polled.get(path) or http_response("404 Not Found", b"{}"))
            await writer.drain()
            return
        await answer(reader, writer, head)

    async with raw_server(handle) as url:
        yield url
