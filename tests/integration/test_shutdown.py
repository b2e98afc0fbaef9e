"""Graceful shutdown of a real `deepinfer-router` process: on SIGTERM it stops accepting
connections, lets the open streams finish, then exits 0; past --shutdown-grace-s what
is still running is cut and the process exits anyway."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import pytest

from tests.support.procs import Proc, Procs, refuses_connections
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)


async def start_fleet(procs: Procs, *router_args: str, sims: int = 2) -> Proc:
    engines = [procs.sim("--kv-blocks", "8192") for _ in range(sims)]
    await asyncio.gather(*(e.wait_healthy() for e in engines))
    args = [a for e in engines for a in ("--engine", e.url)]
    router = procs.router(*args, "--health-interval-s", "0.5", *router_args)
    await router.wait_healthy()
    async with aiohttp.ClientSession() as s:

        async def all_healthy() -> bool:
            async with s.get(router.url + "/ready") as resp:
                detail = await resp.json()
            return bool(detail["engines"]["healthy"] >= sims)

        await wait_until(all_healthy, timeout=10)
    return router


async def open_streams(session: aiohttp.ClientSession, url: str, n: int, max_tokens: int
                       ) -> tuple[list[aiohttp.ClientResponse], list[bytes]]:
    body = {"model": "sim-model", "max_tokens": max_tokens, "stream": True}
    responses = await asyncio.gather(*(
        session.post(url + "/v1/chat/completions",
                     json={**body, "messages": [{"role": "user", "content": f"stream {i}"}]})
        for i in range(n)
    ))
    firsts = []
    for resp in responses:
        assert resp.status == 200
        firsts.append(await resp.content.readany())  # the stream is open and flowing
    return responses, firsts


async def test_sigterm_during_50_open_streams_all_finish(procs):
    router = await start_fleet(procs, "--shutdown-grace-s", "20")
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=40)) as session:
        responses, firsts = await open_streams(session, router.url, 50, max_tokens=300)
        router.signal(signal.SIGTERM)
        rest = [asyncio.create_task(resp.read()) for resp in responses]
        # New connections are refused while the open streams go on.
        await wait_until(lambda: refuses_connections(router.port), timeout=10)
        assert not all(t.done() for t in rest), "streams ended before the listener closed"
        bodies = [first + await t for first, t in zip(firsts, rest, strict=True)]
    code = await router.wait_exit(15)
    assert code == 0
    for body in bodies:
        assert body.endswith(b"data: [DONE]\n\n"), body[-200:]
        assert b'"error"' not in body
    log = router.log_text()
    assert "Traceback" not in log
    assert "shutting down" in log and "stopped" in log
    assert "cutting" not in log  # all finished within the grace: nothing was cut


async def test_grace_deadline_cuts_what_is_left_and_exits(procs):
    router = await start_fleet(procs, "--shutdown-grace-s", "1", sims=1)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        responses, _ = await open_streams(session, router.url, 5, max_tokens=20000)
        sigterm_at = time.monotonic()
        router.signal(signal.SIGTERM)
        code = await router.wait_exit(10)
        took = time.monotonic() - sigterm_at
        for resp in responses:
            with pytest.raises(aiohttp.ClientError):
                await resp.read()  # cut: the body never completes
    assert code == 0
    assert took >= 0.9  # it waited out the grace (1 s) before cutting
    log = router.log_text()
    assert "cutting 5 request(s)" in log and "Traceback" not in log


async def test_requests_on_kept_alive_connections_during_shutdown_get_503(procs):
    """After SIGTERM the listener closes; a client whose connection stayed open (kept
    alive) and sends another request on it gets 503 shutting_down, not a hang or a reset,
    while a stream still runs out its grace."""
    router = await start_fleet(procs, "--shutdown-grace-s", "20", sims=1)
    body = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2}
    one_connection = aiohttp.TCPConnector(limit=1, force_close=False)
    async with aiohttp.ClientSession(connector=one_connection) as kept, \
            aiohttp.ClientSession() as other:
        async with kept.post(router.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 200
            await resp.read()
        streams, _ = await open_streams(other, router.url, 1, max_tokens=2000)
        router.signal(signal.SIGTERM)
        await wait_until(lambda: refuses_connections(router.port), timeout=10)
        # New connections are refused now: an answer can only come over the kept one.
        async with kept.post(router.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"]["code"] == "shutting_down"
        for resp in streams:
            resp.close()
    assert await router.wait_exit(25) == 0
