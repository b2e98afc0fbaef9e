"""`deepinfer-router --workers N`, a real supervisor with real worker processes in front
of real simulated engines: every worker serves the port, a conversation stays on its
engine whichever worker takes each turn, /metrics counts the whole router, admin writes
reach every worker, a killed worker comes back, and SIGTERM drains open streams on every
worker before the parent exits."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.support.procs import Proc, Procs, refuses_connections
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(120)

MODEL = "sim-model"


@pytest.fixture
async def fresh() -> AsyncIterator[aiohttp.ClientSession]:
    """A new connection per request: keep-alive would pin the client to one worker."""
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=60)) as session:
        yield session


async def ready_by_worker(session: aiohttp.ClientSession, url: str, workers: int,
                          engines: int, timeout: float = 30) -> dict[int, dict[str, Any]]:
    """/ready from every worker (each answer names its worker), once each sees every
    engine healthy."""
    seen: dict[int, dict[str, Any]] = {}

    async def every_worker_ready() -> bool:
        async with session.get(url + "/ready") as resp:
            detail = await resp.json()
        if resp.status == 200 and detail["engines"]["healthy"] >= engines:
            seen[detail["worker"]["index"]] = detail
        return len(seen) == workers

    await wait_until(every_worker_ready, timeout=timeout)
    return seen


async def start(procs: Procs, session: aiohttp.ClientSession, *router_args: str,
                workers: int = 2, sims: int = 2) -> Proc:
    engines = [procs.sim("--kv-blocks", "8192") for _ in range(sims)]
    await asyncio.gather(*(e.wait_healthy() for e in engines))
    args = [a for e in engines for a in ("--engine", e.url)]
    router = procs.router(*args, "--workers", str(workers), "--health-interval-s", "0.5",
                          *router_args)
    await router.wait_healthy()
    await ready_by_worker(session, router.url, workers, sims)
    return router


async def chat(session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]],
               max_tokens: int = 8) -> tuple[dict[str, Any], str, str, str]:
    """The answer, its engine, worker and route."""
    async with session.post(url + "/v1/chat/completions", json={
            "model": MODEL, "messages": messages, "max_tokens": max_tokens}) as resp:
        assert resp.status == 200, await resp.text()
        return (await resp.json(), resp.headers["x-deepinfer-engine"],
                resp.headers["x-deepinfer-worker"], resp.headers["x-deepinfer-route"])


def metric_total(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(name + "{") or line.startswith(name + " "))


async def test_conversations_stay_on_their_engine_across_workers(procs, fresh):
    router = await start(procs, fresh)
    switches = turns = 0
    workers_seen: set[str] = set()
    for conv in range(12):
        messages = [{"role": "user", "content": f"conversation {conv}: "
                     + "tell me about routers and caches " * 30}]
        engines: set[str] = set()
        trail = []
        last_worker = None
        for turn in range(4):
            body, engine, worker, route = await chat(fresh, router.url, messages)
            engines.add(engine)
            trail.append((engine, worker, route))
            workers_seen.add(worker)
            if last_worker is not None:
                turns += 1
                switches += worker != last_worker
            last_worker = worker
            messages += [{"role": "assistant", "content": body["choices"][0]["message"]
                          ["content"]}, {"role": "user", "content": f"and then {turn}?"}]
            await asyncio.sleep(0.1)  # think time: longer than the hint interval (20 ms)
        assert len(engines) == 1, f"conversation {conv} moved between engines: {trail}"
    assert workers_seen == {"0", "1"}
    # the kernel handed later turns to the other worker often enough to prove it
    assert switches >= 2, f"only {switches} of {turns} turns changed worker"


async def test_metrics_count_the_whole_router_from_any_worker(procs, fresh):
    router = await start(procs, fresh)
    for i in range(20):
        await chat(fresh, router.url, [{"role": "user", "content": f"count me {i}"}])
    totals: dict[str, float] = {}

    async def both_workers_scraped() -> bool:
        async with fresh.get(router.url + "/metrics") as resp:
            text = await resp.text()
            worker = resp.headers["x-deepinfer-worker"]
        assert metric_total(text, "deepinfer_router_workers_reporting") == 2
        totals[worker] = metric_total(text, "deepinfer_requests_total")
        return len(totals) == 2

    await wait_until(both_workers_scraped, timeout=20)
    assert totals == {"0": 20.0, "1": 20.0}


async def test_admin_write_reaches_every_worker(procs, fresh):
    router = await start(procs, fresh)
    async with fresh.get(router.url + "/admin/engines") as resp:
        engine_id = (await resp.json())["engines"][0]["id"]
    async with fresh.post(router.url + f"/admin/engines/{engine_id}/drain") as resp:
        assert resp.status == 200, await resp.text()
    views: dict[str, bool] = {}

    async def every_worker_answered() -> bool:
        async with fresh.get(router.url + "/admin/engines") as resp:
            engines = {e["id"]: e for e in (await resp.json())["engines"]}
            views[resp.headers["x-deepinfer-worker"]] = engines[engine_id]["state"] == "draining"
        return len(views) == 2

    await wait_until(every_worker_answered, timeout=20)
    assert views == {"0": True, "1": True}
    # and no worker routes to it any more
    for i in range(10):
        _, engine, _, _ = await chat(fresh, router.url, [{"role": "user",
                                                         "content": f"x{i}"}])
        assert engine != engine_id


async def test_a_killed_worker_comes_back_with_the_routers_registrations_and_drains(
        procs, fresh):
    router = await start(procs, fresh)
    # an engine registered in the embedded registry (as an engine manager does), and
    # one static engine drained: the restarted worker must know both before it serves
    extra = procs.sim("--kv-blocks", "8192")
    await extra.wait_healthy()
    async with fresh.post(router.url + "/admin/engines", json={
            "url": extra.url, "models": [MODEL], "ttl_s": 600}) as resp:
        assert resp.status == 200, await resp.text()
        registered = (await resp.json())["id"]
    async with fresh.get(router.url + "/admin/engines") as resp:
        static = next(e["id"] for e in (await resp.json())["engines"]
                      if e["source"] == "static")
    async with fresh.post(router.url + f"/admin/engines/{static}/drain") as resp:
        assert resp.status == 200
    before = await ready_by_worker(fresh, router.url, 2, 2)
    victim = before[0]["worker"]["pid"]
    os.kill(victim, signal.SIGKILL)
    for i in range(10):  # the other worker answers meanwhile
        await chat(fresh, router.url, [{"role": "user", "content": f"still here {i}"}])
    after = await ready_by_worker(fresh, router.url, 2, 2)
    assert after[0]["worker"]["pid"] != victim
    assert after[1]["worker"]["pid"] == before[1]["worker"]["pid"]
    views: dict[str, dict[str, str]] = {}

    async def every_worker_answered() -> bool:
        async with fresh.get(router.url + "/admin/engines") as resp:
            views[resp.headers["x-deepinfer-worker"]] = {
                e["id"]: e["state"] for e in (await resp.json())["engines"]}
        return len(views) == 2

    await wait_until(every_worker_answered, timeout=20)
    for worker, states in views.items():
        assert registered in states, f"worker {worker} lost the registration: {states}"
        assert states[static] == "draining", f"worker {worker} lost the drain: {states}"
    log = router.log_text()
    assert f"worker 0 (pid {victim}) exited with -9" in log
    assert "worker 0 caught up with its siblings" in log


async def test_session_policy_keeps_sessions_across_workers(procs, fresh):
    router = await start(procs, fresh, "--policy", "session")
    for user in range(8):
        engines = set()
        for turn in range(4):
            async with fresh.post(router.url + "/v1/chat/completions", headers={
                    "X-Session-ID": f"user-{user}"}, json={
                    "model": MODEL, "max_tokens": 2,
                    "messages": [{"role": "user", "content": f"turn {turn}"}]}) as resp:
                assert resp.status == 200
                engines.add(resp.headers["x-deepinfer-engine"])
            await asyncio.sleep(0.1)
        assert len(engines) == 1, f"user {user} moved: {engines}"


async def test_a_parent_killed_outright_takes_its_workers_with_it(procs, fresh):
    router = await start(procs, fresh)
    pids = [d["worker"]["pid"] for d in (await ready_by_worker(fresh, router.url, 2,
                                                                2)).values()]
    router.signal(signal.SIGKILL)

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"

    await wait_until(lambda: all(gone(p) for p in pids), timeout=15)
    await wait_until(lambda: refuses_connections(router.port), timeout=5)


async def test_sigterm_drains_open_streams_on_every_worker(procs, fresh):
    router = await start(procs, fresh, "--shutdown-grace-s", "20")
    body = {"model": MODEL, "max_tokens": 300, "stream": True}
    responses = []
    for i in range(16):  # one connection each: spread over both workers
        resp = await fresh.post(router.url + "/v1/chat/completions",
                                json={**body, "messages": [{"role": "user",
                                                            "content": f"stream {i}"}]})
        assert resp.status == 200
        responses.append(resp)
    workers = {resp.headers["x-deepinfer-worker"] for resp in responses}
    assert workers == {"0", "1"}
    firsts = [await resp.content.readany() for resp in responses]
    router.signal(signal.SIGTERM)
    rest = [asyncio.create_task(resp.read()) for resp in responses]
    await wait_until(lambda: refuses_connections(router.port), timeout=10)
    assert not all(t.done() for t in rest), "streams ended before the listener closed"
    bodies = [first + await t for first, t in zip(firsts, rest, strict=True)]
    assert await router.wait_exit(30) == 0
    for data in bodies:
        assert data.endswith(b"data: [DONE]\n\n"), data[-200:]
        assert b'"error"' not in data
    log = router.log_text()
    assert "Traceback" not in log
    assert log.count("shutting down") == 2 and "all workers stopped" in log
    assert "cutting" not in log


async def test_a_tenants_budget_holds_for_the_whole_router(procs, fresh, tmp_path):
    """Each tenant's budgets live in one worker; the others ask it, so a limit holds
    router-wide, whichever worker the kernel hands each connection to."""
    config = tmp_path / "router.toml"
    config.write_text('[tenants.team]\nkeys = ["key-team-5c1d"]\nrequests_per_minute = 6\n'
                      '[tenants.free]\nkeys = ["key-free-0a9e"]\n')
    router = await start(procs, fresh, "--config", str(config))
    statuses: list[int] = []
    workers: set[str] = set()
    for i in range(16):
        async with fresh.post(router.url + "/v1/chat/completions", headers={
                "Authorization": "Bearer key-team-5c1d"}, json={
                "model": MODEL, "max_tokens": 1,
                "messages": [{"role": "user", "content": f"q{i}"}]}) as resp:
            await resp.read()
            statuses.append(resp.status)
            workers.add(resp.headers["x-deepinfer-worker"])
            if resp.status == 429:
                assert resp.headers["x-ratelimit-limit-requests"] == "6"
    assert len(workers) == 2  # both workers took some
    assert statuses.count(200) == 6 and statuses[:6] == [200] * 6
    async with fresh.post(router.url + "/v1/chat/completions", headers={
            "Authorization": "Bearer key-free-0a9e"}, json={
            "model": MODEL, "max_tokens": 1,
            "messages": [{"role": "user", "content": "x"}]}) as resp:
        assert resp.status == 200  # another tenant is not held by it
