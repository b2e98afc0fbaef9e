"""Fault injection against real processes: simulated engines (`deepinfer-engine sim`
subprocesses, switched with their fault flags and `POST /admin/faults`) behind the
router. Each test names the failure mode of docs/operations.md it proves."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import time
from collections import Counter
from typing import Any

import aiohttp
import orjson
import pytest

from deepinfer_router.state import STATE
from tests.support.echo_engine import STATE as ENGINE
from tests.support.echo_engine import RunningServer
from tests.support.procs import Proc, Procs
from tests.support.router_metrics import metric
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

CHAT = "/v1/chat/completions"


def chat(max_tokens: int = 8, stream: bool = False, text: str = "hello") -> dict[str, Any]:
    return {"model": "sim-model", "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, "stream": stream}


async def start_sims(procs: Procs, n: int, *args: str) -> list[Proc]:
    sims = [procs.sim("--kv-blocks", "4096", *args) for _ in range(n)]
    await asyncio.gather(*(s.wait_healthy() for s in sims))
    return sims


async def ready(r: RunningServer, engines: int) -> None:
    fleet = r.app[STATE].fleet
    await wait_until(
        lambda: sum(1 for e in fleet.engines.values() if e.state(time.monotonic()) == "healthy")
        >= engines,
        timeout=10,
    )


def engine_url(r: RunningServer, engine_id: str) -> str:
    return r.app[STATE].fleet.engines[engine_id].record.url


def sse_events(body: bytes) -> list[str]:
    return [line[6:] for line in body.decode().split("\n") if line.startswith("data: ")]


async def set_faults(http: aiohttp.ClientSession, sim: Proc, **faults: Any) -> None:
    async with http.post(sim.url + "/admin/faults", json=faults) as resp:
        assert resp.status == 200, await resp.text()


async def post(http: aiohttp.ClientSession, r: RunningServer, body: dict[str, Any]
               ) -> tuple[int, str, bytes]:
    async with http.post(r.url + CHAT, json=body) as resp:
        return resp.status, resp.headers.get("x-deepinfer-engine", ""), await resp.read()


# --- engine killed mid-stream ----------------------------------------------------------
async def test_engine_killed_mid_stream(procs, router, http):
    """SIGKILL of the engine serving a stream: the client gets one SSE error event and
    [DONE]; the next requests all succeed on the other engine, and once the health check
    has seen the dead engine, no request tries it any more."""
    sims = await start_sims(procs, 2)
    r = await router(engine=[s.url for s in sims], policy="least-conn", health_interval_s=0.3,
                     health_timeout_s=0.5, retry_backoff_s=0.005)
    await ready(r, 2)
    resp = await http.post(r.url + CHAT, json=chat(max_tokens=3000, stream=True))
    assert resp.status == 200
    victim_id = resp.headers["x-deepinfer-engine"]
    victim = next(s for s in sims if s.url == engine_url(r, victim_id))
    received = b""
    while received.count(b"data: ") < 5:
        received += await resp.content.readany()
    victim.signal(signal.SIGKILL)
    received += await asyncio.wait_for(resp.read(), 10)
    resp.release()
    events = sse_events(received)
    assert events[-1] == "[DONE]"
    error = orjson.loads(events[-2])["error"]
    assert error["type"] == "upstream_error" and error["message"]
    assert sum(1 for e in events if '"delta"' in e) >= 4  # the tokens before the kill

    # The next requests avoid it: every one succeeds, on the survivor.
    for i in range(10):
        status, engine, _ = await post(http, r, chat(text=f"after {i}"))
        assert status == 200 and engine != victim_id
    fleet = r.app[STATE].fleet
    await wait_until(lambda: fleet.engines[victim_id].state(time.monotonic())
                     in ("unhealthy", "ejected"), timeout=5)
    retries = metric(r, "deepinfer_retries_total")
    for i in range(10):
        status, engine, _ = await post(http, r, chat(text=f"later {i}", stream=i % 2 == 0))
        assert status == 200 and engine != victim_id
    assert metric(r, "deepinfer_retries_total") == retries  # not even tried any more
    assert metric(r, "deepinfer_upstream_errors_total", engine=victim_id, kind="reset") == 1
    assert all(e.inflight == 0 for e in fleet.engines.values())


# --- engine that accepts but never answers ----------------------------------------------
async def test_hanging_engine_times_out_is_ejected_and_traffic_moves(procs, router, http):
    """Requests to an engine that accepts and never answers end in 504 after the
    first-byte timeout (not retried: the engine may still be working), count towards
    ejection; once ejected, traffic moves to the healthy engine. After the cool-down one
    half-open probe goes to it, fails, and opens the circuit again at once (its /health
    still answers, which must not close the circuit)."""
    sims = await start_sims(procs, 2)
    hung = sims[0]
    await set_faults(http, hung, fault_hang_rate=1.0)
    r = await router(engine=[s.url for s in sims], policy="round-robin",
                     first_byte_timeout_s=0.4, eject_after_failures=2, eject_cooldown_s=1.5,
                     health_interval_s=0.2)
    await ready(r, 2)
    hung_id = next(e.id for e in r.app[STATE].fleet.engines.values() if e.record.url == hung.url)

    outcomes: list[tuple[int, str]] = []
    for i in range(10):
        status, engine, body = await post(http, r, chat(stream=i % 2 == 1, text=f"q{i}"))
        outcomes.append((status, engine))
        if status == 504:
            assert engine == "" or engine == hung_id
            assert orjson.loads(body)["error"]["code"] == "first_byte_timeout"
    assert sum(1 for s, _ in outcomes if s == 504) == 2
    assert all(s == 200 for s, _ in outcomes[4:])  # ejected after the 2nd: all on the other
    fleet = r.app[STATE].fleet
    assert fleet.engines[hung_id].state(time.monotonic()) == "ejected"
    assert metric(r, "deepinfer_upstream_errors_total", engine=hung_id,
                  kind="first_byte_timeout") == 2
    assert metric(r, "deepinfer_retries_total") == 0  # timeouts never retry

    # Past the cool-down: half-open (health checks pass meanwhile).
    await wait_until(lambda: fleet.engines[hung_id].ejected_until <= time.monotonic(), 10)
    statuses = [(await post(http, r, chat(text=f"p{i}")))[0] for i in range(6)]
    assert statuses.count(504) == 1  # the one probe
    assert fleet.engines[hung_id].state(time.monotonic()) == "ejected"
    assert all(e.inflight == 0 for e in fleet.engines.values())


async def _give_up_after(http: aiohttp.ClientSession, r: RunningServer, body: dict[str, Any],
                         seconds: float) -> None:
    """A client that leaves after `seconds` (or once the answer's first chunk came)."""
    with contextlib.suppress(asyncio.TimeoutError, aiohttp.ClientError):
        async with asyncio.timeout(seconds), http.post(r.url + CHAT, json=body) as resp:
            await resp.content.readany()


async def test_clients_leaving_first_do_not_hide_a_hanging_engine(procs, router, http):
    """Every client gives up before --first-byte-timeout-s: the engine's first-byte
    clock keeps running, so a hanging engine is still counted failing and ejected (it
    used to be counted a success each time, and never ejected)."""
    (hung,) = await start_sims(procs, 1)
    await set_faults(http, hung, fault_hang_rate=1.0)
    r = await router(engine=[hung.url], first_byte_timeout_s=0.5, eject_after_failures=2,
                     eject_cooldown_s=60, health_interval_s=0.1, max_retries=0)
    await ready(r, 1)
    (state,) = r.app[STATE].fleet.engines.values()
    for failures in (1, 2):
        await _give_up_after(http, r, chat(text=f"q{failures}"), 0.1)
        await wait_until(lambda: state.inflight == 0, timeout=5)
        assert state.consecutive_failures == failures - 1  # not before the deadline
        await wait_until(lambda n=failures: state.consecutive_failures == n, timeout=5)
    assert state.state(time.monotonic()) == "ejected"


async def test_a_client_leaving_is_neither_success_nor_failure(echo_engines, router, http):
    """Failures counted before a client leaves stay counted, and a half-open probe whose
    client leaves does not close the circuit."""
    a = await echo_engines("a")
    r = await router(engine=[a.url], max_retries=0, eject_after_failures=2,
                     eject_cooldown_s=0.3)
    await ready(r, 1)
    (state,) = r.app[STATE].fleet.engines.values()
    engine = a.app[ENGINE]
    engine.fail_status = 500
    body = {"model": "m1", "prompt": "x", "max_tokens": 50, "stream": True}
    status, _, _ = await post(http, r, body)
    assert status == 502 and state.consecutive_failures == 1
    engine.fail_status = None
    engine.token_delay_s = 0.05
    await _give_up_after(http, r, body, 5.0)  # leaves after the first chunk
    await wait_until(lambda: state.inflight == 0, timeout=5)
    assert state.consecutive_failures == 1
    engine.fail_status = 500
    await post(http, r, body)
    assert state.ejected_until > 0  # circuit open
    # Cool-down over: the next request is the half-open probe.
    await wait_until(lambda: state.ejected_until <= time.monotonic(), 5)
    engine.fail_status = None
    await _give_up_after(http, r, body, 5.0)
    await wait_until(lambda: state.inflight == 0, timeout=5)
    assert state.ejected_until > 0 and state.consecutive_failures == 2  # still open
    assert not state.probing  # the probe's turn passes on
    status, _, _ = await post(http, r, {**body, "stream": False})  # a real answer closes it
    assert status == 200 and state.ejected_until == 0 and state.consecutive_failures == 0


async def test_stalled_engine_stream_ends_with_idle_timeout_and_is_freed(procs, router, http):
    """A simulated engine whose stream goes silent mid-answer (connection open): after
    --stream-idle-timeout-s the client gets the tokens so far, an SSE error event and
    [DONE]; the router closes its connection to the engine and leaks no in-flight count."""
    (sim,) = await start_sims(procs, 1, "--fault-stall-rate", "1", "--fault-stall-after-tokens",
                              "3")
    r = await router(engine=[sim.url], stream_idle_timeout_s=0.5)
    await ready(r, 1)
    async with http.post(r.url + CHAT, json=chat(max_tokens=50, stream=True)) as resp:
        assert resp.status == 200
        events = sse_events(await resp.read())
    assert events[-1] == "[DONE]"
    error = orjson.loads(events[-2])["error"]
    assert error["type"] == "timeout_error" and "idle" in error["message"]
    tokens = [e for e in events[:-2] if orjson.loads(e)["choices"][0]["delta"].get("content")]
    assert len(tokens) == 3
    assert metric(r, "deepinfer_upstream_errors_total", kind="idle_timeout") == 1

    async def engine_idle() -> bool:
        async with http.get(sim.url + "/metrics") as m:
            text = await m.text()
        return any(line.startswith("vllm:num_requests_running{") and line.endswith(" 0.0")
                   for line in text.splitlines())

    await wait_until(engine_idle, timeout=5)  # nothing left running on the engine
    # the silent connection was closed, not kept or pooled (only proxied requests use it)
    await wait_until(lambda: r.app[STATE].upstream_pool().open_connections() == 0, timeout=2)
    assert r.app[STATE].fleet.engines[next(iter(r.app[STATE].fleet.engines))].inflight == 0


async def test_idle_and_total_timeouts_mid_stream(echo_engines, router, http):
    """A stream that goes silent longer than --stream-idle-timeout-s, or outlasts
    --request-timeout-s, ends with an SSE error event (504 type) and [DONE]."""
    a = await echo_engines("a")
    a.app[ENGINE].token_delay_s = 0.3
    r = await router(engine=[a.url], stream_idle_timeout_s=0.15, first_byte_timeout_s=5)
    await ready(r, 1)
    body = {"model": "m1", "prompt": "x", "max_tokens": 5, "stream": True}
    async with http.post(r.url + "/v1/completions", json=body) as resp:
        # the first chunk is due within the first-byte timeout, the next one is late
        assert resp.status == 200
        events = sse_events(await resp.read())
    assert events[-1] == "[DONE]"
    error = orjson.loads(events[-2])["error"]
    assert error["type"] == "timeout_error" and "idle" in error["message"]
    engine_id = next(iter(r.app[STATE].fleet.engines))
    assert metric(r, "deepinfer_upstream_errors_total", kind="idle_timeout") == 1

    a.app[ENGINE].token_delay_s = 0.1
    r2 = await router(engine=[a.url], request_timeout_s=0.45)
    await ready(r2, 1)
    async with http.post(r2.url + "/v1/completions", json={**body, "max_tokens": 50}) as resp:
        assert resp.status == 200
        events = sse_events(await resp.read())
    error = orjson.loads(events[-2])["error"]
    assert events[-1] == "[DONE]" and "request-timeout" in error["message"]
    assert 1 <= sum(1 for e in events if '"text"' in e) <= 5
    assert metric(r2, "deepinfer_upstream_errors_total", engine=engine_id,
                  kind="total_timeout") == 1


async def test_total_timeout_before_first_byte_is_504(procs, router, http):
    (sim,) = await start_sims(procs, 1, "--fault-ttft-delay-s", "3")
    r = await router(engine=[sim.url], request_timeout_s=0.4)
    await ready(r, 1)
    status, _, body = await post(http, r, chat())
    assert status == 504
    err = orjson.loads(body)["error"]
    assert err["code"] == "total_timeout" and err["type"] == "timeout_error"
    assert metric(r, "deepinfer_upstream_errors_total", kind="total_timeout") == 1


async def test_connect_timeout_retries_on_another_engine(echo_engines, router, http):
    """An engine whose listen queue is full (SYNs dropped) never completes the TCP
    handshake: --connect-timeout-s, then the request is retried elsewhere."""
    good = await echo_engines("good")
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    fillers = []
    for _ in range(3):  # fill the accept queue so that further SYNs are dropped
        c = socket.socket()
        c.setblocking(False)
        try:
            c.connect(blackhole.getsockname())
        except BlockingIOError:
            pass
        fillers.append(c)
    try:
        r = await router(policy="round-robin", connect_timeout_s=0.3, health_interval_s=30,
                         retry_backoff_s=0)
        for url in (good.url, f"http://127.0.0.1:{blackhole.getsockname()[1]}"):
            async with http.post(r.url + "/admin/engines", json={"url": url, "models": ["m1"]}
                                 ) as resp:
                assert resp.status == 200
        body = {"model": "m1", "prompt": "x"}
        for _ in range(4):
            async with http.post(r.url + "/v1/completions", json=body) as resp:
                assert resp.status == 200
        assert metric(r, "deepinfer_upstream_errors_total", kind="connect_timeout") >= 1
        assert metric(r, "deepinfer_retries_total", reason="connect_timeout") >= 1
    finally:
        for c in fillers:
            c.close()
        blackhole.close()


# --- engine returning 500 for a share of requests -----------------------------------------
async def test_engine_500s_are_retried_client_success_stays_100_percent(procs, router, http):
    sims = await start_sims(procs, 2, "--speed", "20")
    flaky = sims[0]
    await set_faults(http, flaky, fault_error_rate=0.5)
    r = await router(engine=[s.url for s in sims], policy="round-robin", retry_backoff_s=0.002,
                     eject_cooldown_s=0.3)
    await ready(r, 2)
    flaky_id = next(e.id for e in r.app[STATE].fleet.engines.values()
                    if e.record.url == flaky.url)
    sem = asyncio.Semaphore(8)
    statuses: Counter[int] = Counter()

    async def one(i: int) -> None:
        async with sem:
            body = chat(max_tokens=4, stream=i % 3 == 0, text=f"req {i}")
            async with http.post(r.url + CHAT, json=body) as resp:
                payload = await resp.read()
                statuses[resp.status] += 1
                if body["stream"]:
                    assert sse_events(payload)[-1] == "[DONE]"
                    assert b'"error"' not in payload

    await asyncio.gather(*(one(i) for i in range(200)))
    assert statuses == {200: 200}
    failures = metric(r, "deepinfer_upstream_errors_total", engine=flaky_id, kind="status_500")
    assert failures > 0
    assert metric(r, "deepinfer_retries_total", reason="status_500") == failures


# --- burst of 5x capacity ------------------------------------------------------------------
async def test_burst_of_five_times_capacity(procs, router, http):
    """80 requests at once into a router that runs 8 and queues 8: the rest get 429 with
    Retry-After at once (queue_full, not after a wait); no crash; admitted ones finish."""
    sims = await start_sims(procs, 2)
    r = await router(engine=[s.url for s in sims], max_inflight=8, max_queue=8,
                     queue_timeout_s=5)
    await ready(r, 2)

    async def one(i: int) -> tuple[int, str | None, bytes]:
        async with http.post(r.url + CHAT, json=chat(max_tokens=30, text=f"b{i}")) as resp:
            body = await resp.read()
            return resp.status, resp.headers.get("Retry-After"), body

    results = await asyncio.gather(*(one(i) for i in range(80)))
    ok = [x for x in results if x[0] == 200]
    rejected = [x for x in results if x[0] == 429]
    assert len(ok) + len(rejected) == 80
    assert len(ok) >= 16  # 8 running + 8 queued at least
    assert rejected, "a 5x burst must be shed"
    for _, retry_after, body in rejected:
        assert retry_after is not None and int(retry_after) >= 1
        # queue_full: shed at arrival, not after waiting (that would be queue_timeout)
        assert orjson.loads(body)["error"]["code"] == "queue_full"
    state = r.app[STATE]
    assert state.admission.inflight == 0 and state.admission.queued == 0
    assert metric(r, "deepinfer_rejected_requests_total", reason="queue_full") == len(rejected)
    assert metric(r, "deepinfer_queue_wait_seconds_count") > 0
    async with http.get(r.url + "/ready") as resp:
        assert resp.status == 200
    assert (await post(http, r, chat()))[0] == 200


async def test_per_engine_limit_waits_in_the_bounded_queue(procs, router, http):
    """With every engine at --max-inflight-per-engine, requests wait in the admission
    queue (woken as engine requests finish) instead of failing; beyond --max-queue, or
    after --queue-timeout-s, 429 with Retry-After."""
    sims = await start_sims(procs, 2)
    r = await router(engine=[s.url for s in sims], max_inflight_per_engine=2, max_queue=6,
                     queue_timeout_s=8)
    await ready(r, 2)
    fleet = r.app[STATE].fleet
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, *(e.inflight for e in fleet.engines.values()))
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    results = await asyncio.gather(*(post(http, r, chat(max_tokens=20, text=f"w{i}"))
                                     for i in range(16)))
    watcher.cancel()
    statuses = Counter(s for s, _, _ in results)
    assert statuses == {200: 10, 429: 6}  # 4 running + 6 queued, 6 refused
    assert peak <= 2
    for status, _, body in results:
        if status == 429:
            assert orjson.loads(body)["error"]["code"] == "engine_queue_full"
    assert metric(r, "deepinfer_queue_wait_seconds_count") == 6
    assert r.app[STATE].admission.queued == 0

    # A wait longer than --queue-timeout-s ends in 429 too.
    r2 = await router(engine=[sims[0].url], max_inflight_per_engine=1, queue_timeout_s=0.3)
    await ready(r2, 1)
    slow = asyncio.create_task(post(http, r2, chat(max_tokens=200)))
    await wait_until(lambda: r2.app[STATE].admission.inflight == 1)
    status, _, body = await post(http, r2, chat())
    assert status == 429 and orjson.loads(body)["error"]["code"] == "engine_queue_timeout"
    assert (await slow)[0] == 200


async def test_waiters_take_an_engine_that_joins_and_wait_after_a_failed_attempt(
    echo_engines, router, http
):
    """A request waiting for room (every engine at --max-inflight-per-engine) goes to an
    engine that joins meanwhile at once, not when the busy one frees up; and a request
    whose attempt failed while the other engine was full waits for that engine instead
    of getting the failure."""
    busy = await echo_engines("busy")
    busy.app[ENGINE].token_delay_s = 0.1
    r = await router(policy="least-conn", max_inflight_per_engine=1, queue_timeout_s=10,
                     retry_backoff_s=0)
    busy_id = await register(http, r, busy.url)
    completion = {"model": "m1", "prompt": "x"}
    slow = asyncio.create_task(
        http.post(r.url + "/v1/completions", json={**completion, "max_tokens": 40, "stream": True}))
    await wait_until(lambda: r.app[STATE].fleet.engines[busy_id].inflight == 1)
    waiting = asyncio.create_task(http.post(r.url + "/v1/completions", json=completion))
    await wait_until(lambda: r.app[STATE].admission.engine_waiting == 1)
    fresh = await echo_engines("fresh")
    fresh_id = await register(http, r, fresh.url)
    resp = await waiting
    assert resp.status == 200 and resp.headers["x-deepinfer-engine"] == fresh_id
    # Served by the engine that joined while the slow stream still holds the busy one.
    assert not slow.done() and r.app[STATE].fleet.engines[busy_id].inflight == 1

    # the fresh engine fails now; the busy one is still full: wait for it, then succeed
    fresh.app[ENGINE].fail_status = 500
    resp2 = await http.post(r.url + "/v1/completions", json=completion)
    assert resp2.status == 200, await resp2.text()
    assert resp2.headers["x-deepinfer-engine"] == busy_id
    assert metric(r, "deepinfer_upstream_errors_total", engine=fresh_id, kind="status_500") == 1
    slow_resp = await slow
    assert slow_resp.status == 200 and b"[DONE]" in await slow_resp.read()
    assert r.app[STATE].admission.queued == 0


async def register(http: aiohttp.ClientSession, r: RunningServer, url: str) -> str:
    async with http.post(r.url + "/admin/engines", json={"url": url, "models": ["m1"]}) as resp:
        assert resp.status == 200, await resp.text()
        engine_id = str((await resp.json())["id"])
    await wait_until(lambda: r.app[STATE].fleet.engines[engine_id].state(time.monotonic())
                     == "healthy", timeout=10)
    return engine_id


# --- drain and deregistration ----------------------------------------------------------------
async def test_deregistration_keeps_inflight_stream_and_stops_new(echo_engines, router, http):
    a, b = await echo_engines("a"), await echo_engines("b")
    a.app[ENGINE].token_delay_s = b.app[ENGINE].token_delay_s = 0.02
    r = await router(policy="least-conn")
    ids = []
    for e in (a, b):
        async with http.post(r.url + "/admin/engines", json={"url": e.url, "models": ["m1"]}
                             ) as resp:
            ids.append((await resp.json())["id"])
    resp = await http.post(r.url + "/v1/completions", json={
        "model": "m1", "prompt": "x", "max_tokens": 20, "stream": True})
    leaving = resp.headers["x-deepinfer-engine"]
    async with http.delete(r.url + f"/admin/engines/{leaving}") as d:
        assert d.status == 200
    assert leaving not in r.app[STATE].fleet.engines
    body = await resp.read()
    assert body.endswith(b"data: [DONE]\n\n") and b'"error"' not in body
    for _ in range(4):
        async with http.post(r.url + "/v1/completions", json={"model": "m1", "prompt": "x"}
                             ) as resp2:
            assert resp2.status == 200 and resp2.headers["x-deepinfer-engine"] != leaving
    assert r.app[STATE].admission.inflight == 0


# --- active health checks ---------------------------------------------------------------------
async def test_active_health_checks_take_idle_engine_out_and_back(procs, router, http):
    """No traffic at all: a dead engine is found by /health checks alone, and a restarted
    one comes back."""
    sims = await start_sims(procs, 2)
    r = await router(engine=[s.url for s in sims], health_interval_s=0.2, health_timeout_s=0.3)
    await ready(r, 2)
    fleet = r.app[STATE].fleet
    dead = sims[0]
    dead_id = next(e.id for e in fleet.engines.values() if e.record.url == dead.url)
    dead.signal(signal.SIGKILL)
    await dead.wait_exit(5)
    await wait_until(lambda: fleet.engines[dead_id].state(time.monotonic()) == "unhealthy",
                     timeout=5)
    for i in range(4):
        status, engine, _ = await post(http, r, chat(text=f"h{i}"))
        assert status == 200 and engine != dead_id
    assert metric(r, "deepinfer_retries_total") == 0  # never even tried
    revived = procs.sim("--kv-blocks", "4096", port=dead.port)
    await revived.wait_healthy()
    await wait_until(lambda: fleet.engines[dead_id].state(time.monotonic()) == "healthy",
                     timeout=5)
