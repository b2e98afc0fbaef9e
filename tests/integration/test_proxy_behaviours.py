"""Proxy and admission behaviours each checked over real sockets: 501 is never retried, a
stream whose headers come before any data, a non-streaming body that stalls or breaks
halfway, header filtering in both directions, repeated Set-Cookie, a multipart request
without `model`, the router-wide queue timing out, clients leaving while queued."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import aiohttp
import pytest

from deepinfer_router.state import STATE
from tests.support.echo_engine import STATE as ENGINE
from tests.support.echo_engine import RunningServer
from tests.support.raw_engine import raw_engine, reset
from tests.support.router_metrics import metric
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(30)

Router = Callable[..., Awaitable[RunningServer]]
Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter
COMPLETION = {"model": "m1", "prompt": "x", "max_tokens": 2}


async def routable(r: RunningServer, n: int = 1) -> None:
    fleet = r.app[STATE].fleet
    await wait_until(lambda: len(fleet.candidates("m1", time.monotonic())) >= n, timeout=10)


# --- 501 ------------------------------------------------------------------------------------
async def test_501_passes_through_and_is_never_retried(echo_engines, router):
    a = await echo_engines("a")
    b = await echo_engines("b")
    a.app[ENGINE].fail_status = 501
    b.app[ENGINE].fail_status = 501
    r = await router(engine=[a.url, b.url], max_retries=3, policy="round-robin")
    await routable(r, 2)
    async with aiohttp.ClientSession() as s:
        for _ in range(4):
            async with s.post(r.url + "/v1/completions", json=COMPLETION) as resp:
                assert resp.status == 501
                assert (await resp.json())["error"]["message"] == "injected failure"
    # One engine request per client request, none counted against the engines.
    assert len(a.app[ENGINE].received) + len(b.app[ENGINE].received) == 4
    assert metric(r, "deepinfer_retries_total") == 0
    assert metric(r, "deepinfer_upstream_errors_total") == 0
    assert all(e.consecutive_failures == 0 for e in r.app[STATE].fleet.engines.values())


# --- streams whose headers come alone ------------------------------------------------------
SSE_HEAD = (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def test_stream_headers_before_any_data_and_an_empty_first_delta(router):
    """vLLM sends a stream's headers at once and its first event after prefill, and that
    first event carries an empty content (the role only). The router waits for the
    first data (not the headers) before answering, and relays every event intact."""
    first = (b'data: {"choices":[{"index":0,"delta":{"role":"assistant","content":""}}]}'
             b"\n\n")
    rest = b'data: {"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\ndata: [DONE]\n\n'
    headers_sent = asyncio.Event()
    release = asyncio.Event()

    async def answer(reader: Reader, writer: Writer, head: bytes) -> None:
        writer.write(SSE_HEAD)
        await writer.drain()
        headers_sent.set()
        await release.wait()
        writer.write(chunk(first))
        await writer.drain()
        writer.write(chunk(rest) + b"0\r\n\r\n")
        await writer.drain()

    async with raw_engine(answer) as url:
        r = await router(engine=[url], max_retries=0)
        await routable(r)
        async with aiohttp.ClientSession() as s:
            sent = asyncio.create_task(s.post(r.url + "/v1/chat/completions", json={
                "model": "m1", "messages": [{"role": "user", "content": "x"}],
                "stream": True}))
            await asyncio.wait_for(headers_sent.wait(), 5)
            # The engine's headers are in; the client has no answer yet (until data).
            assert not sent.done()
            assert metric(r, "deepinfer_time_to_first_token_seconds_count") == 0
            release.set()
            resp = await asyncio.wait_for(sent, 5)
            body = await resp.read()
            resp.close()
    assert resp.status == 200
    assert body == first + rest
    assert metric(r, "deepinfer_time_to_first_token_seconds_count") == 1


# --- non-streaming bodies that stall or break halfway --------------------------------------
JSON_HEAD_1000 = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n")


async def test_non_streaming_body_stalling_halfway_is_504_idle_timeout(router):
    left = asyncio.Event()

    async def answer(reader: Reader, writer: Writer, head: bytes) -> None:
        writer.write(JSON_HEAD_1000 + b'{"partial": ' + b" " * 100)
        await writer.drain()
        await reader.read()  # until the router closes the connection
        left.set()

    async with raw_engine(answer) as url:
        r = await router(engine=[url], max_retries=2, stream_idle_timeout_s=0.3)
        await routable(r)
        async with aiohttp.ClientSession() as s, s.post(
            r.url + "/v1/completions", json=COMPLETION
        ) as resp:
            assert resp.status == 504
            err = (await resp.json())["error"]
    assert err["code"] == "idle_timeout"
    await asyncio.wait_for(left.wait(), 5)  # the engine connection was closed
    assert metric(r, "deepinfer_retries_total") == 0  # the engine may still be working
    assert metric(r, "deepinfer_upstream_errors_total", kind="idle_timeout") == 1


async def test_non_streaming_body_reset_halfway_is_retried_elsewhere(echo_engines, router):
    async def answer(reader: Reader, writer: Writer, head: bytes) -> None:
        writer.write(JSON_HEAD_1000 + b'{"partial": ')
        await writer.drain()
        reset(writer)

    good = await echo_engines("good")
    async with raw_engine(answer) as url:
        r = await router(engine=[url, good.url], max_retries=1, policy="round-robin",
                         retry_backoff_s=0)
        await routable(r, 2)
        async with aiohttp.ClientSession() as s:
            for _ in range(2):  # round-robin: one of them goes to the breaking engine first
                async with s.post(r.url + "/v1/completions", json=COMPLETION) as resp:
                    assert resp.status == 200
                    assert (await resp.json())["choices"][0]["text"]
    resets = metric(r, "deepinfer_upstream_errors_total", kind="reset")
    assert resets >= 1  # every one retried on the good engine, which served both
    assert metric(r, "deepinfer_retries_total", reason="reset") == resets
    assert len(good.app[ENGINE].received) == 2


# --- headers both ways -----------------------------------------------------------------------
async def test_header_filtering_both_ways_and_repeated_set_cookie(router):
    seen: list[bytes] = []

    async def answer(reader: Reader, writer: Writer, head: bytes) -> None:
        seen.append(head)
        body = b'{"ok": true}'
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n" % len(body)
            + b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
            b"Proxy-Authenticate: Basic\r\nTrailer: X-Checksum\r\n"
            b"X-Request-Id: engine-own-id\r\nx-deepinfer-engine: forged\r\n"
            b"Set-Cookie: a=1; Path=/\r\nSet-Cookie: b=2; HttpOnly\r\n"
            b"X-Engine-Header: kept\r\nX-Engine-Header: twice\r\n\r\n" + body
        )
        await writer.drain()

    async with raw_engine(answer) as url:
        r = await router(engine=[url], max_retries=0)
        await routable(r)
        engine_id = next(iter(r.app[STATE].fleet.engines))
        async with aiohttp.ClientSession() as s, s.post(
            r.url + "/v1/completions", json=COMPLETION,
            headers={"Connection": "keep-alive, X-Drop-Me", "X-Drop-Me": "1",
                     "Keep-Alive": "timeout=9", "TE": "trailers", "Upgrade": "h2c",
                     "Proxy-Authorization": "Basic abc", "X-Request-Id": "client-id",
                     "X-Forwarded-For": "10.0.0.9", "X-Client-Header": "kept"},
        ) as resp:
            assert resp.status == 200
            got = resp.headers
            cookies = got.getall("Set-Cookie")
            engine_headers = got.getall("X-Engine-Header")
            assert await resp.json() == {"ok": True}
    # Engine -> client: hop-by-hop gone, the router's own headers win, repeats intact.
    assert cookies == ["a=1; Path=/", "b=2; HttpOnly"]
    assert engine_headers == ["kept", "twice"]
    for name in ("Keep-Alive", "Proxy-Authenticate", "Trailer"):
        assert name not in got, name
    assert got.getall("X-Request-Id") == ["client-id"]
    assert got.getall("x-deepinfer-engine") == [engine_id]
    # Client -> engine: hop-by-hop and what Connection names gone; the chain appended.
    (head,) = seen
    lines = [line.decode() for line in head.split(b"\r\n")[1:] if line]
    sent = {}
    for line in lines:
        name, _, value = line.partition(":")
        sent.setdefault(name.lower(), []).append(value.strip())
    for name in ("connection", "x-drop-me", "keep-alive", "te", "upgrade",
                 "proxy-authorization"):
        assert name not in sent, name
    assert sent["x-client-header"] == ["kept"]
    assert sent["x-request-id"] == ["client-id"]
    assert sent["x-forwarded-for"] == ["10.0.0.9, 127.0.0.1"]


# --- multipart without a model -----------------------------------------------------------------
async def test_multipart_without_model_goes_to_the_only_model(echo_engines, router):
    a = await echo_engines("a", ["whisper"])
    r = await router(engine=[a.url])
    fleet = r.app[STATE].fleet
    await wait_until(lambda: fleet.models(time.monotonic()) == ["whisper"], timeout=10)

    def form() -> aiohttp.FormData:
        data = aiohttp.FormData()
        data.add_field("file", b"RIFF....WAVE", filename="a.wav", content_type="audio/wav")
        data.add_field("language", "en")
        return data

    async with aiohttp.ClientSession() as s:
        async with s.post(r.url + "/v1/audio/transcriptions", data=form()) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["x-deepinfer-engine"] == next(iter(fleet.engines))
        b = await echo_engines("b", ["other"])
        async with s.post(r.url + "/admin/engines", json={"url": b.url, "models": ["other"]}):
            pass
        await wait_until(lambda: len(fleet.models(time.monotonic())) == 2, timeout=10)
        async with s.post(r.url + "/v1/audio/transcriptions", data=form()) as resp:
            assert resp.status == 400  # two models served: which one is not guessed
            assert (await resp.json())["error"]["code"] == "model_required"


# --- admission ------------------------------------------------------------------------------------
async def test_router_wide_queue_times_out_and_clients_leaving_the_queue_free_it(
    echo_engines, router
):
    a = await echo_engines("a")
    a.app[ENGINE].token_delay_s = 0.2  # a 20-token stream holds the one slot for ~4 s
    r = await router(engine=[a.url], max_inflight=1, max_queue=4, queue_timeout_s=0.5)
    await routable(r)
    admission = r.app[STATE].admission
    slow_body = {**COMPLETION, "max_tokens": 20, "stream": True}
    async with aiohttp.ClientSession() as s:
        holder = await s.post(r.url + "/v1/completions", json=slow_body)
        assert holder.status == 200
        assert admission.inflight == 1
        # Queued, then timed out: 429 queue_timeout.
        async with s.post(r.url + "/v1/completions", json=COMPLETION) as resp:
            assert resp.status == 429
            assert (await resp.json())["error"]["code"] == "queue_timeout"
            assert resp.headers["Retry-After"] == "1"
        # Clients that leave while queued leave nothing behind.
        leaving = [asyncio.create_task(s.post(r.url + "/v1/completions", json=COMPLETION))
                   for _ in range(3)]
        await wait_until(lambda: admission.queued == 3, timeout=5)
        for task in leaving:
            task.cancel()
        await wait_until(lambda: admission.queued == 0, timeout=5)
        assert admission.inflight == 1
        holder.close()  # the slot holder leaves too
        await wait_until(lambda: admission.inflight == 0, timeout=5)
        async with s.post(r.url + "/v1/completions", json=COMPLETION) as resp:
            assert resp.status == 200  # the slot is free again
    assert metric(r, "deepinfer_rejected_requests_total", reason="queue_timeout") == 1
