"""Precise routing through HTTP with simulated engines that publish KV events: the real
router (embedded registry) subscribes to each simulator's feed from its engine record and
routes a prompt to the engine that really holds it, including one warmed directly (which
the router's estimate cannot know); both event encodings; chat prompts too where the
simulators tokenize with a real byte-level BPE tokenizer that the router verifies."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from deepinfer_engine.sim.server import SimServer, start_sim_server
from deepinfer_engine.sim.settings import SimSettings
from deepinfer_router.state import STATE
from tests.support.procs import free_port
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)
MODEL = "sim-model"


def kv_config(port: int, replay: int) -> str:
    return json.dumps({"enable_kv_cache_events": True, "publisher": "zmq",
                       "endpoint": f"tcp://127.0.0.1:{port}",
                       "replay_endpoint": f"tcp://127.0.0.1:{replay}", "topic": "kv"})


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.e2e.tiny_model import build_tokenizer

    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(out)
    return out


@pytest.fixture(params=["stand-in tokenizer", "BPE tokenizer"])
async def fleet(router: Any, request: pytest.FixtureRequest, tokenizer_dir: Path
                ) -> AsyncIterator[tuple[Any, list[SimServer]]]:
    r = await router(policy="kv-aware", engine_ttl_s=30)
    bpe = request.param == "BPE tokenizer"
    sims = []
    for i, encoding in enumerate(("tagged", "positional", "tagged")):
        settings = SimSettings(model=MODEL, kv_blocks=2048, block_size=16, speed=50.0,
                               seed=i, registry=str(r.url), heartbeat_s=1,
                               kv_events_config=kv_config(free_port(), free_port()),
                               kv_events_encoding=encoding,
                               tokenizer=str(tokenizer_dir) if bpe else None)
        sims.append(await start_sim_server(settings))
    state = r.app[STATE]
    feeds = state.kv_feeds
    assert feeds is not None
    await wait_until(lambda: len(state.fleet.candidates(MODEL, time.monotonic())) == 3,
                     timeout=15)
    await wait_until(lambda: all(feeds.precise(e) for e in state.fleet.engines), timeout=15)
    yield r, sims
    for sim in sims:
        await sim.close()


async def completion(s: aiohttp.ClientSession, base: str, ids: list[int], rid: str = ""
                     ) -> tuple[dict[str, Any], dict[str, str]]:
    body = {"model": MODEL, "prompt": ids, "max_tokens": 2}
    headers = {"X-Request-Id": rid} if rid else {}
    async with s.post(base + "/v1/completions", json=body, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json(), dict(resp.headers)


async def test_a_prompt_warmed_directly_is_routed_where_it_is_cached(
        fleet: tuple[Any, list[SimServer]]) -> None:
    r, sims = fleet
    state = r.app[STATE]
    by_url = {e.record.url: e.id for e in state.fleet.engines.values()}
    async with aiohttp.ClientSession() as s:
        for n, sim in enumerate(sims):  # each encoding's engine in turn
            ids = [1000 * (n + 1) + i for i in range(200)]
            await completion(s, sim.url, ids)  # straight to the engine
            engine = by_url[sim.url]
            index = state.kv_feeds.index
            await wait_until(lambda e=engine, t=ids, x=index: e in x.match(t, [e]),
                             timeout=10)
            out, headers = await completion(s, str(r.url), ids, rid=f"warm-{n}")
            assert headers["x-deepinfer-engine"] == engine, (n, headers)
            assert headers["x-deepinfer-route"] == "prefix"
            async with s.get(f"{r.url}/admin/decisions/warm-{n}") as resp:
                d = await resp.json()
            cached = out["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert d["index"] == "precise" and cached == 192  # 12 of 12 full blocks but last
            assert d["predicted_cached_tokens"] == cached and d["actual"]["misroute"] is False
        async with s.get(f"{r.url}/ready") as resp:
            ready = await resp.json()
    assert set(ready["kv_event_feeds"].values()) == {"live"}


async def test_an_eviction_the_router_did_not_cause_is_seen(
        fleet: tuple[Any, list[SimServer]]) -> None:
    """The router sends a prompt to an engine; other traffic straight to that engine
    evicts it; the precise index knows the engine no longer holds it."""
    r, sims = fleet
    state = r.app[STATE]
    feeds = state.kv_feeds
    ids = list(range(5000, 5200))
    async with aiohttp.ClientSession() as s:
        _, headers = await completion(s, str(r.url), ids)
        engine = headers["x-deepinfer-engine"]
        sim = next(x for x in sims if state.fleet.engines[engine].record.url == x.url)
        await wait_until(lambda: engine in feeds.index.match(ids, [engine]), timeout=10)
        for k in range(12):  # 12 x 190 tokens > 2048 blocks x 16: the LRU turns over
            await completion(s, sim.url, [90_000 + 1000 * k + i for i in range(190)] * 15)
        await wait_until(lambda: engine not in feeds.index.match(ids, [engine])
                         or feeds.index.match(ids, [engine])[engine][0].blocks == 0,
                         timeout=10)
        out, headers = await completion(s, str(r.url), ids, rid="after-eviction")
        async with s.get(f"{r.url}/admin/decisions/after-eviction") as resp:
            d = await resp.json()
    chosen = next(c for c in d["candidates"] if c["engine"] == engine)
    assert chosen["index"] == "precise" and chosen["predicted_cached_tokens"] == 0
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == d["actual"]["cached_tokens"]


async def test_chat_prompts_route_precisely_once_the_tokenizer_is_verified(
        fleet: tuple[Any, list[SimServer]]) -> None:
    r, sims = fleet
    state = r.app[STATE]
    if sims[0].settings.tokenizer is None:
        # the stand-in tokenizer is no tokenizer a router can load: chats stay approximate
        await asyncio.sleep(0.5)
        assert state.tokenizers is not None and state.tokenizers.get(MODEL) is None
        return
    tokenizers = state.tokenizers
    assert tokenizers is not None
    await wait_until(lambda: tokenizers.get(MODEL) is not None, timeout=20)
    by_url = {e.record.url: e.id for e in state.fleet.engines.values()}
    async with aiohttp.ClientSession() as s:
        for n, sim in enumerate(sims):
            body = {"model": MODEL, "max_tokens": 2, "messages": [
                {"role": "system", "content": f"engine {n} knows this system prompt. " * 40},
                {"role": "user", "content": "what does it know?"}]}
            async with s.post(sim.url + "/v1/chat/completions", json=body) as resp:
                assert resp.status == 200  # straight to the engine
            engine = by_url[sim.url]
            await wait_until(lambda e=engine: e in state.kv_feeds.index.engines
                             and len(state.kv_feeds.index.engines[e]) > 0, timeout=10)
            await asyncio.sleep(0.2)
            async with s.post(str(r.url) + "/v1/chat/completions", json=body,
                              headers={"X-Request-Id": f"chat-{n}"}) as resp:
                assert resp.status == 200
                out, headers = await resp.json(), resp.headers
            assert headers["x-deepinfer-engine"] == engine and \
                headers["x-deepinfer-route"] == "prefix", (n, dict(headers))
            async with s.get(f"{r.url}/admin/decisions/chat-{n}") as resp:
                d = await resp.json()
            cached = out["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert d["index"] == "precise" and d["prompt"]["tokens_exact"] and cached > 0
            assert d["predicted_cached_tokens"] == cached, d
        async with s.get(f"{r.url}/ready") as resp:
            assert (await resp.json())["prompt_tokenizers"] == {MODEL: "verified"}


async def test_a_long_new_prompt_is_tokenized_only_as_far_as_some_engine_holds_it(
        fleet: tuple[Any, list[SimServer]]) -> None:
    """A long prompt with much text the router has not tokenized before: its start first;
    where an engine holds all of that start the whole prompt is tokenized (and predicted
    exactly), where none does the start is enough to know nobody holds more (and the rest
    is encoded after the route, for the prompt's next request)."""
    r, sims = fleet
    state = r.app[STATE]
    if sims[0].settings.tokenizer is None:
        return  # no tokenizer for the router: nothing tokenized at all
    tokenizers = state.tokenizers
    assert tokenizers is not None
    await wait_until(lambda: tokenizers.get(MODEL) is not None, timeout=20)
    engine = next(e.id for e in state.fleet.engines.values() if e.record.url == sims[1].url)
    held = {"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "system", "content": "a long system prompt held by one engine. " * 200},
        {"role": "user", "content": "what does it say?"}]}
    fresh = {"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "system", "content": "a long system prompt nobody has seen yet. " * 200},
        {"role": "user", "content": "what does it say?"}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(sims[1].url + "/v1/chat/completions", json=held) as resp:
            assert resp.status == 200  # straight to the engine
        await wait_until(lambda: len(state.kv_feeds.index.engines.get(engine, ())) > 100,
                         timeout=10)
        await asyncio.sleep(0.2)
        decisions = {}
        for rid, body in (("held", held), ("fresh", fresh)):
            async with s.post(str(r.url) + "/v1/chat/completions", json=body,
                              headers={"X-Request-Id": rid}) as resp:
                assert resp.status == 200
                out = await resp.json()
            async with s.get(f"{r.url}/admin/decisions/{rid}") as resp:
                decisions[rid] = (await resp.json(), out)
    d, out = decisions["held"]
    cached = out["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert d["engine"] == engine and d["index"] == "precise" and d["prompt"]["tokens_exact"]
    assert cached > 1000 and d["predicted_cached_tokens"] == cached, d
    d, out = decisions["fresh"]
    assert d["index"] == "precise" and not d["prompt"]["tokens_exact"], d
    assert all(c["predicted_cached_tokens"] == 0 for c in d["candidates"]), d
    assert out["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # ... and the rest of the fresh prompt was encoded after, off its path: when it comes
    # back, it is a cache lookup, not an encoding before routing
    tok = tokenizers.get(MODEL)
    assert tok is not None
    await wait_until(lambda: tokenizers.warmer.warmed >= 1, timeout=10)
    rendered = tok.render(fresh)
    assert rendered is not None and rendered.uncached_chars < 100
    async with aiohttp.ClientSession() as s, s.get(f"{r.url}/metrics") as resp:
        text = await resp.text()
    assert 'deepinfer_prompts_encoded_ahead_total{result="warmed"} 1.0' in text, text
