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


from .connection import MAX_HEAD_BYTES, MAX_HEADER_FIELDS
from .errors import (
    UpstreamConnectError,
    UpstreamConnectTimeout,
    UpstreamDisconnected,
    UpstreamError,
    UpstreamProtocolError,
)
from .pool import UpstreamPool
from .response import UpstreamResponse

__all__ = [
    "MAX_HEADER_FIELDS",
    "MAX_HEAD_BYTES",
    "UpstreamConnectError",
    "UpstreamConnectTimeout",
    "UpstreamDisconnected",
    "UpstreamError",
    "UpstreamPool",
    "UpstreamProtocolError",
    "UpstreamResponse",
]
