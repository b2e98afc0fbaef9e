"""kv-aware routing end to end: the real router in front of simulated engines (in-process,
fast clock), over HTTP. Conversations stay on one engine, a new conversation with a known
long system prompt joins the engine holding it, and a flood of one prefix spills."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import aiohttp
import pytest

from deepinfer_engine.sim.server import SimServer
from deepinfer_router.state import STATE
from tests.support.sim_fleet import MODEL
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(30)


# ~10k tokens, ~40k characters: far more than one request of load is worth in the scoring
SYSTEM = "You are a support agent for ACME routers. Answer briefly and politely. " * 560


async def kv_router(router: Any, sims: list[SimServer]) -> str:
    r = await router(engine=[s.url for s in sims], policy="kv-aware")
    fleet = r.app[STATE].fleet

    def ready() -> bool:
        return len(fleet.candidates(MODEL, time.monotonic())) == len(sims)

    await wait_until(ready, timeout=10)
    return str(r.url)


async def chat(
    session: aiohttp.ClientSession, url: str, messages: list[dict[str, str]],
    max_tokens: int = 8, session_id: str | None = None,
) -> tuple[str, str, str]:
    """(engine, route, answer)"""
    headers = {"X-Session-ID": session_id} if session_id else {}
    body = {"model": MODEL, "messages": messages, "max_tokens": max_tokens}
    async with session.post(url + "/v1/chat/completions", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        data = await resp.json()
        return (resp.headers["x-deepinfer-engine"], resp.headers["x-deepinfer-route"],
                data["choices"][0]["message"]["content"])


async def converse(
    session: aiohttp.ClientSession, url: str, system: str, name: str, rounds: int,
    session_id: str | None = None,
) -> list[tuple[str, str]]:
    messages = [{"role": "system", "content": system}]
    out = []
    for r in range(rounds):
        messages.append({"role": "user", "content": f"{name}, question {r}: " + "why? " * 40})
        engine, route, answer = await chat(session, url, messages, session_id=session_id)
        messages.append({"role": "assistant", "content": answer})
        out.append((engine, route))
    return out


async def test_conversations_stay_on_one_engine(router: Any, sims: list[SimServer]) -> None:
    url = await kv_router(router, sims)
    async with aiohttp.ClientSession() as s:
        # growing history, no session key: the prefix keeps it in place
        by_history = await converse(s, url, "Be terse. " * 30, "ann", 5)
        assert len({e for e, _ in by_history}) == 1, by_history
        assert [r for _, r in by_history[1:]] == ["prefix"] * 4, by_history
        # a session id: bound to its engine whatever the prompt
        first = await chat(s, url, [{"role": "user", "content": "hi " * 20}], session_id="bob")
        for i in range(4):
            engine, route, _ = await chat(
                s, url, [{"role": "user", "content": f"unrelated {i} " * 20}], session_id="bob"
            )
            assert (engine, route) == (first[0], "session")


async def test_new_conversation_joins_the_engine_holding_its_system_prompt(
    router: Any, sims: list[SimServer]
) -> None:
    url = await kv_router(router, sims)
    async with aiohttp.ClientSession() as s:
        first = await converse(s, url, SYSTEM, "carol", 2)
        home = first[0][0]
        # other conversations with unrelated prompts land anywhere...
        for i in range(3):
            await chat(s, url, [{"role": "user", "content": f"other {i} " * 200}])
        # ...a new one with the same long system prompt goes where it is cached
        engine, route, _ = await chat(
            s, url, [{"role": "system", "content": SYSTEM},
                     {"role": "user", "content": "dave here: " + "how? " * 30}],
        )
        assert (engine, route) == (home, "prefix")
    # and the engine really had it: its own prefix-cache hits cover the system prompt
    hits = {sim.url: sim.state.engine.stats.prefix_cache_hits for sim in sims}
    assert max(hits.values()) >= 2 * 9000, hits


async def test_a_flood_of_one_prefix_spills_to_a_second_engine(
    router: Any, sims: list[SimServer]
) -> None:
    url = await kv_router(router, sims)
    async with aiohttp.ClientSession() as s:
        home, _, _ = await chat(s, url, [{"role": "system", "content": SYSTEM},
                                         {"role": "user", "content": "warm up"}])
        flood = await asyncio.gather(*(
            chat(s, url, [{"role": "system", "content": SYSTEM},
                          {"role": "user", "content": f"user {i}: " + "what? " * 10}],
                 max_tokens=64)
            for i in range(30)
        ))
    engines = Counter(e for e, _, _ in flood)
    routes = Counter(r for _, r, _ in flood)
    assert routes["spill"] > 0, routes
    assert len(engines) >= 2, engines
    # affinity held as long as the bound allowed: the home engine took the most
    assert engines.most_common(1)[0][0] == home, (home, engines)
    assert routes["prefix"] >= engines[home] - 1, (routes, engines)



async def test_prefill_work_is_pending_until_the_first_streamed_token(
    echo_engines: Any, router: Any
) -> None:
    """The uncached prompt counts as pending work on its engine until the engine streams
    its first token (prefill done), not until the answer ends."""
    from tests.support.echo_engine import STATE as ENGINE

    engine = await echo_engines("a")
    engine.app[ENGINE].token_delay_s = 0.4  # before every token, the first included
    r = await router(engine=[engine.url], policy="kv-aware")
    state = r.app[STATE]
    await wait_until(lambda: bool(state.fleet.candidates("m1", time.monotonic())), timeout=10)
    engine_id = next(iter(state.fleet.engines))
    prompt = "a long prompt nobody has sent before " * 100
    body = {"model": "m1", "prompt": prompt, "max_tokens": 3, "stream": True}
    async with aiohttp.ClientSession() as s:
        sent = asyncio.create_task(s.post(r.url + "/v1/completions", json=body))
        await wait_until(lambda: state.fleet.engines[engine_id].inflight > 0, timeout=10)
        assert state.policy.pending_chars(engine_id) == len(prompt)
        # the client gets the headers with the first chunk: by then prefill is over,
        # while the request is still in flight
        resp = await sent
        assert resp.status == 200
        assert state.fleet.engines[engine_id].inflight == 1
        assert state.policy.pending_chars(engine_id) == 0
        await resp.read()
    assert state.fleet.engines[engine_id].inflight == 0
    assert state.policy.pending_chars(engine_id) == 0
