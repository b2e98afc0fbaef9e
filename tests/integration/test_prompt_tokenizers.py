"""Which tokenizer the router uses per model, and only once an engine agrees: the
service against real aiohttp engines whose /tokenize is vLLM's (transformers' tokenizer:
apply_chat_template for messages, special tokens added for a prompt)."""

from __future__ import annotations

import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from deepinfer_router.prompt_tokens.service import PromptTokenizers
from deepinfer_router.shared.engine_record import EngineRecord, KvEventsEndpoints
from tests.e2e.tiny_model import build_tokenizer
from tests.support.echo_engine import RunningServer

transformers = pytest.importorskip("transformers")
MODEL = "tiny"
FEED = KvEventsEndpoints(endpoint="tcp://127.0.0.1:9")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(out)
    return out


def tokenize_app(tokenizer_dir: Path, *, add_generation_prompt: bool = True) -> web.Application:
    """vLLM's /tokenize: chat through the chat template, a prompt with special tokens.
    `add_generation_prompt=False` stands for an engine whose template differs."""
    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))

    async def tokenize(request: web.Request) -> web.Response:
        body = await request.json()
        if "messages" in body:
            ids = tok.apply_chat_template(body["messages"], tokenize=True,
                                          add_generation_prompt=add_generation_prompt)
            ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        else:
            ids = tok(body["prompt"])["input_ids"]
        return web.json_response({"count": len(ids), "tokens": ids, "max_model_len": 4096})

    app = web.Application()
    app.router.add_post("/tokenize", tokenize)
    return app


async def sync_until(service: PromptTokenizers, model: str, want: str) -> str:
    for _ in range(100):
        await service.sync()
        state = service.states().get(model, "")
        if state.startswith(want):
            return state
    return service.states().get(model, "")


async def test_a_tokenizer_is_used_once_an_engine_agrees(
        serve_app: Callable[..., Awaitable[RunningServer]], tokenizer_dir: Path) -> None:
    engine = await serve_app(tokenize_app(tokenizer_dir))
    records = [EngineRecord(url=engine.url, models=[MODEL], kv_events=FEED,
                            tokenizer=str(tokenizer_dir))]
    live = {records[0].id}
    async with aiohttp.ClientSession() as session:
        service = PromptTokenizers(lambda: records, live.__contains__, lambda: session)
        assert await sync_until(service, MODEL, "verified") == "verified"
        ids = service.prompt_ids(MODEL, {"messages": [{"role": "user", "content": "hello"}]})
        assert ids and isinstance(ids[0], int)
        # the feed goes down: nothing needs token ids for the model any more
        live.clear()
        await service.sync()
        assert service.get(MODEL) is None and service.states() == {}


async def test_an_engine_that_disagrees_keeps_the_approximate_index(
        serve_app: Callable[..., Awaitable[RunningServer]], tokenizer_dir: Path) -> None:
    engine = await serve_app(tokenize_app(tokenizer_dir, add_generation_prompt=False))
    records = [EngineRecord(url=engine.url, models=[MODEL], kv_events=FEED,
                            tokenizer=str(tokenizer_dir))]
    async with aiohttp.ClientSession() as session:
        service = PromptTokenizers(lambda: records, lambda _: True, lambda: session,
                                   retry_s=3600)
        state = await sync_until(service, MODEL, "disagrees")
        assert state.startswith("disagrees with engine") and "chat probe" in state, state
        assert service.get(MODEL) is None
        assert service.prompt_ids(MODEL, {"prompt": "x"}) is None


async def test_where_the_tokenizer_comes_from(
        serve_app: Callable[..., Awaitable[RunningServer]], tokenizer_dir: Path,
        tmp_path: Path) -> None:
    engine = await serve_app(tokenize_app(tokenizer_dir))
    # a record naming a directory this host does not have, and none configured
    elsewhere = EngineRecord(url=engine.url, models=[MODEL], kv_events=FEED,
                             tokenizer=str(tmp_path / "not-here"))
    no_feed = EngineRecord(url=engine.url, models=["other"], tokenizer=str(tokenizer_dir))
    async with aiohttp.ClientSession() as session:
        service = PromptTokenizers(lambda: [elsewhere, no_feed], lambda _: True,
                                   lambda: session)
        assert (await sync_until(service, MODEL, "no tokenizer")).startswith("no tokenizer")
        assert "other" not in service.states()  # no KV events: nothing to tokenize for
        # --tokenizer MODEL=DIR names it instead
        copy = tmp_path / "configured"
        shutil.copytree(tokenizer_dir, copy)
        configured = PromptTokenizers(lambda: [elsewhere], lambda _: True, lambda: session,
                                      configured={MODEL: str(copy)})
        assert await sync_until(configured, MODEL, "verified") == "verified"
        # an unusable directory is refused with its reason
        broken = tmp_path / "broken"
        broken.mkdir()
        (broken / "tokenizer.json").write_text("{")
        bad = PromptTokenizers(lambda: [elsewhere], lambda _: True, lambda: session,
                               configured={MODEL: str(broken)})
        assert (await sync_until(bad, MODEL, "unusable")).startswith("unusable tokenizer")


async def test_an_engine_that_cannot_be_asked_is_not_trusted(
        tokenizer_dir: Path) -> None:
    records = [EngineRecord(url="http://127.0.0.1:9", models=[MODEL], kv_events=FEED,
                            tokenizer=str(tokenizer_dir))]
    async with aiohttp.ClientSession() as session:
        service = PromptTokenizers(lambda: records, lambda _: True, lambda: session,
                                   probe_timeout_s=2)
        state = await sync_until(service, MODEL, "disagrees")
        assert "probe" in state and service.get(MODEL) is None, state


async def test_ids_are_trusted_per_engine_instance(
        serve_app: Callable[..., Awaitable[RunningServer]], tokenizer_dir: Path) -> None:
    """Two engines serve the model, one with another chat template: the tokenizer is
    used, for the engine that agrees only; an engine restarted (a new instance) is
    checked again before its index is trusted with the router's ids."""
    good = await serve_app(tokenize_app(tokenizer_dir))
    odd = await serve_app(tokenize_app(tokenizer_dir, add_generation_prompt=False))
    a = EngineRecord(url=good.url, instance="a-1", models=[MODEL], kv_events=FEED,
                     tokenizer=str(tokenizer_dir))
    b = EngineRecord(url=odd.url, instance="b-1", models=[MODEL], kv_events=FEED,
                     tokenizer=str(tokenizer_dir))
    records = [a, b]
    async with aiohttp.ClientSession() as session:
        service = PromptTokenizers(lambda: records, lambda _: True, lambda: session,
                                   retry_s=0)
        state = await sync_until(service, MODEL, "verified on 1 of 2")
        assert state.startswith("verified on 1 of 2 engines; disagrees with engine "
                                + b.id), state
        assert service.get(MODEL) is not None and service.agreeing == {MODEL: {a.id: "a-1"}}
        # engine a restarts: until checked again its index is not asked
        records[0] = a.model_copy(update={"instance": "a-2"})
        records.pop()  # and b goes away
        await service.sync()
        assert service.agreeing == {MODEL: {a.id: "a-2"}} and service.states()[MODEL] == "verified"
