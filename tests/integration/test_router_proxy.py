"""The router in front of real aiohttp engines, driven by the real `openai` client and raw
HTTP: completions, streaming, pass-through, headers and the error shapes."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import openai
import orjson
import pytest
from openai import AsyncOpenAI

from deepinfer_router.state import STATE
from tests.support.echo_engine import STATE as ENGINE
from tests.support.echo_engine import RunningServer
from tests.support.router_metrics import metric
from tests.support.waiting import wait_until


async def ready(router: RunningServer, n_models: int = 1) -> None:
    fleet = router.app[STATE].fleet
    await wait_until(lambda: len(fleet.models(time.monotonic())) >= n_models)


def client(router: RunningServer) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=router.url + "/v1", api_key="unused", max_retries=0)


async def test_openai_client_chat_completions_embeddings_and_streams(echo_engines, router):
    a, b = await echo_engines("a"), await echo_engines("b")
    r = await router(engine=[a.url, b.url + "/v1"], policy="least-conn")
    await ready(r)
    c = client(r)

    raw = await c.chat.completions.with_raw_response.create(
        model="m1", messages=[{"role": "user", "content": "hello"}], max_tokens=3
    )
    chat = raw.parse()
    assert chat.choices[0].message.content == "tok tok tok"
    assert raw.headers["x-deepinfer-engine"] in {s.id for s in r.app[STATE].fleet.engines.values()}
    assert raw.headers["x-deepinfer-route"] == "least-conn"
    assert raw.headers["x-request-id"]

    completion = await c.completions.create(model="m1", prompt="hi", max_tokens=2)
    assert completion.choices[0].text == "tok tok"

    embedding = await c.embeddings.create(model="m1", input="hi")
    assert embedding.data[0].embedding == [0.1, 0.2, 0.3]

    stream = await c.chat.completions.create(
        model="m1", messages=[{"role": "user", "content": "hi"}], max_tokens=4, stream=True
    )
    pieces = [chunk.choices[0].delta.content async for chunk in stream]
    assert pieces == ["tok0 ", "tok1 ", "tok2 ", "tok3 "]

    stream2 = await c.completions.create(model="m1", prompt="x", max_tokens=3, stream=True)
    assert [chunk.choices[0].text async for chunk in stream2] == ["tok0 ", "tok1 ", "tok2 "]
    # Least-connection spreads sequential requests over both engines.
    assert a.app[ENGINE].completed > 0 and b.app[ENGINE].completed > 0


async def test_body_passes_through_byte_for_byte_and_request_id(echo_engines, router):
    a = await echo_engines("a")
    r = await router(engine=[a.url])
    await ready(r)
    body = b'{"model": "m1",  "prompt": "x", "top_k": 7, "guided_json": {"type": "object"}}'
    async with aiohttp.ClientSession() as s, s.post(
        r.url + "/v1/completions", data=body,
        headers={"Content-Type": "application/json", "X-Request-Id": "req-123"},
    ) as resp:
        assert resp.status == 200
        assert resp.headers["X-Request-Id"] == "req-123"
        assert resp.headers["x-deepinfer-engine"]
        assert resp.headers["x-deepinfer-route"]
    engine = a.app[ENGINE]
    assert engine.raw[-1] == body
    assert engine.headers[-1]["X-Request-Id"] == "req-123"


async def test_vllm_routes_and_multipart_audio(echo_engines, router):
    a = await echo_engines("a")
    r = await router(engine=[a.url])
    await ready(r)
    async with aiohttp.ClientSession() as s:
        async with s.post(r.url + "/tokenize", json={"model": "m1", "prompt": "x"}) as resp:
            assert resp.status == 200
        form = aiohttp.FormData()
        form.add_field("model", "m1")
        form.add_field("file", b"RIFF....WAVE", filename="a.wav", content_type="audio/wav")
        async with s.post(r.url + "/v1/audio/transcriptions", data=form) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["text"] == "transcribed"
    assert b"RIFF....WAVE" in a.app[ENGINE].raw[-1]


async def test_models_union_over_engines(echo_engines, router):
    a = await echo_engines("a", ["m1"])
    b = await echo_engines("b", ["m2", "m1"])
    r = await router(engine=[a.url, b.url])
    await ready(r, 2)
    models = await client(r).models.list()
    assert sorted(m.id for m in models.data) == ["m1", "m2"]


def _is_openai_error(payload: dict) -> bool:
    err = payload.get("error")
    return isinstance(err, dict) and {"message", "type", "code"} <= err.keys()


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_body"),
        (b'{"model": 5, "prompt": "x"}', 400, "invalid_model"),
        (b'{"model": "nope", "prompt": "x"}', 404, "model_not_found"),
    ],
)
async def test_bad_input_errors(echo_engines, router, body, status, code):
    a = await echo_engines("a")
    r = await router(engine=[a.url])
    await ready(r)
    async with aiohttp.ClientSession() as s, s.post(
        r.url + "/v1/completions", data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        assert resp.status == status
        payload = await resp.json()
    assert _is_openai_error(payload)
    assert payload["error"]["code"] == code
    if status == 404:
        assert "m1" in payload["error"]["message"]


async def test_missing_model_uses_the_only_model_else_400(echo_engines, router):
    a = await echo_engines("a", ["m1"])
    r = await router(engine=[a.url])
    await ready(r)
    async with aiohttp.ClientSession() as s:
        async with s.post(r.url + "/v1/completions", json={"prompt": "x"}) as resp:
            assert resp.status == 200
        assert a.app[ENGINE].received[-1]["model"] == "m1"
        b = await echo_engines("b", ["m2"])
        r2 = await router(engine=[a.url, b.url])
        await ready(r2, 2)
        async with s.post(r2.url + "/v1/completions", json={"prompt": "x"}) as resp:
            assert resp.status == 400
            payload = await resp.json()
    assert payload["error"]["code"] == "model_required"
    assert "m1" in payload["error"]["message"] and "m2" in payload["error"]["message"]


async def test_body_too_large_413(echo_engines, router):
    a = await echo_engines("a")
    r = await router(engine=[a.url], max_body_mb=0.01)
    await ready(r)
    async with aiohttp.ClientSession() as s, s.post(
        r.url + "/v1/completions", json={"model": "m1", "prompt": "x" * 20000}
    ) as resp:
        assert resp.status == 413
        assert _is_openai_error(await resp.json())


async def test_no_engine_503_and_openai_client_sees_it(echo_engines, router):
    a = await echo_engines("a")
    r = await router(engine=[a.url], max_retries=0)
    await ready(r)
    state = r.app[STATE]
    engine_id = next(iter(state.fleet.engines))
    async with aiohttp.ClientSession() as s:
        async with s.post(r.url + f"/admin/engines/{engine_id}/drain") as resp:
            assert resp.status == 200
        async with s.post(r.url + "/v1/completions", json={"model": "m1", "prompt": "x"}) as resp:
            assert resp.status == 503
            assert _is_openai_error(await resp.json())
    with pytest.raises(openai.InternalServerError) as info:
        await client(r).completions.create(model="m1", prompt="x")
    assert info.value.status_code == 503


@pytest.mark.parametrize("legacy", [False, True], ids=["vllm-0.32-shape", "old-flat-shape"])
async def test_upstream_5xx_answered_502_when_no_other_engine(echo_engines, router, legacy):
    a = await echo_engines("a")
    a.app[ENGINE].fail_status = 500
    a.app[ENGINE].legacy_errors = legacy
    r = await router(engine=[a.url], max_retries=1)
    await ready(r)
    async with aiohttp.ClientSession() as s, s.post(
        r.url + "/v1/completions", json={"model": "m1", "prompt": "x"}
    ) as resp:
        assert resp.status == 502
        payload = await resp.json()
    assert _is_openai_error(payload)
    # The engine's own message is quoted whichever shape it used.
    assert "500" in payload["error"]["message"]
    assert "injected failure" in payload["error"]["message"]


@pytest.mark.parametrize("legacy", [False, True], ids=["vllm-0.32-shape", "old-flat-shape"])
async def test_engine_4xx_passes_through_unchanged(echo_engines, router, legacy):
    a = await echo_engines("a")
    a.app[ENGINE].fail_status = 400
    a.app[ENGINE].legacy_errors = legacy
    r = await router(engine=[a.url])
    await ready(r)
    async with aiohttp.ClientSession() as s, s.post(
        r.url + "/v1/completions", json={"model": "m1", "prompt": "x"}
    ) as resp:
        assert resp.status == 400
        payload = await resp.json()
    error = payload if legacy else payload["error"]
    assert error["message"] == "injected failure" and error["code"] == 400
    assert ("object" in payload) is legacy  # byte for byte: the shape is the engine's
    assert r.app[STATE].fleet.engines[next(iter(r.app[STATE].fleet.engines))].inflight == 0


async def test_engine_dying_mid_stream_ends_with_sse_error_event(echo_engines, router):
    a = await echo_engines("a")
    a.app[ENGINE].drop_after = 2
    r = await router(engine=[a.url])
    await ready(r)
    async with aiohttp.ClientSession() as s, s.post(
        r.url + "/v1/completions",
        json={"model": "m1", "prompt": "x", "max_tokens": 10, "stream": True},
        timeout=aiohttp.ClientTimeout(total=10),
    ) as resp:
        assert resp.status == 200
        text = (await resp.read()).decode()
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    error = orjson.loads(events[-2])
    assert _is_openai_error(error)
    assert sum(1 for e in events if '"text"' in e) == 2
    fleet = r.app[STATE].fleet
    assert all(s.inflight == 0 for s in fleet.engines.values())


async def test_client_disconnect_mid_stream_cancels_upstream(echo_engines, router):
    a = await echo_engines("a")
    a.app[ENGINE].token_delay_s = 0.05
    r = await router(engine=[a.url])
    await ready(r)
    async with aiohttp.ClientSession() as s:
        resp = await s.post(
            r.url + "/v1/chat/completions",
            json={"model": "m1", "messages": [{"role": "user", "content": "x"}],
                  "max_tokens": 200, "stream": True},
        )
        assert resp.status == 200
        await resp.content.readline()
        resp.close()  # the client goes away after the first event
    engine = a.app[ENGINE]
    await wait_until(lambda: engine.cancelled == 1, timeout=5)
    assert engine.completed == 0
    fleet = r.app[STATE].fleet
    await wait_until(lambda: all(s.inflight == 0 for s in fleet.engines.values()), timeout=5)
    assert r.app[STATE].admission.inflight == 0


async def test_thousand_mixed_requests_leave_no_inflight(echo_engines, router):
    """Successes, client cancellations mid-stream, engine 5xx and client 4xx mixed:
    every in-flight gauge ends at zero."""
    good = await echo_engines("good", ["m1"])
    good.app[ENGINE].token_delay_s = 0.002
    bad = await echo_engines("bad", ["broken"])
    bad.app[ENGINE].fail_status = 500
    r = await router(engine=[good.url, bad.url], max_retries=1, retry_backoff_s=0)
    await ready(r, 2)
    sem = asyncio.Semaphore(48)
    outcomes: dict[str, int] = {}

    async def one(i: int, s: aiohttp.ClientSession) -> None:
        kind = ("ok", "cancel", "5xx", "4xx", "stream")[i % 5]
        async with sem:
            if kind == "ok":
                async with s.post(r.url + "/v1/completions",
                                  json={"model": "m1", "prompt": "x", "max_tokens": 2}) as resp:
                    status = resp.status
            elif kind == "stream":
                async with s.post(r.url + "/v1/completions", json={
                    "model": "m1", "prompt": "x", "max_tokens": 5, "stream": True}) as resp:
                    await resp.read()
                    status = resp.status
            elif kind == "cancel":
                resp = await s.post(r.url + "/v1/completions", json={
                    "model": "m1", "prompt": "x", "max_tokens": 50, "stream": True})
                await resp.content.readline()
                resp.close()
                status = 499
            elif kind == "5xx":
                async with s.post(r.url + "/v1/completions",
                                  json={"model": "broken", "prompt": "x"}) as resp:
                    status = resp.status
            else:
                async with s.post(r.url + "/v1/completions", data=b"{oops") as resp:
                    status = resp.status
            outcomes[f"{kind}:{status}"] = outcomes.get(f"{kind}:{status}", 0) + 1

    deadline = time.monotonic() + 120
    async with aiohttp.ClientSession() as s:
        await asyncio.wait_for(
            asyncio.gather(*(one(i, s) for i in range(1000))), deadline - time.monotonic()
        )
    # The failing engine is ejected after a few 502s; then its model has no engine (503).
    failed = outcomes.pop("5xx:502", 0) + outcomes.pop("5xx:503", 0)
    assert failed == 200
    assert outcomes == {"ok:200": 200, "cancel:499": 200, "4xx:400": 200, "stream:200": 200}
    state = r.app[STATE]
    await wait_until(
        lambda: all(e.inflight == 0 for e in state.fleet.engines.values()), timeout=10
    )
    assert state.admission.inflight == 0 and state.admission.queued == 0
    async with aiohttp.ClientSession() as s, s.get(r.url + "/metrics") as resp:
        text = await resp.text()
    gauges = [line for line in text.splitlines()
              if line.startswith("deepinfer_engine_inflight_requests{")]
    assert gauges and all(line.endswith(" 0.0") for line in gauges)
    # The router's own account of each outcome, not the test's: cancelled ones are 499.
    total = "deepinfer_requests_total"
    assert metric(r, total, status="499") == 200
    assert metric(r, total, status="200") == 400
    assert metric(r, total, status="400") == 200
    assert metric(r, total, status="502") + metric(r, total, status="503") == 200
    assert metric(r, total) == 1000  # each request counted once
    # The default policy (kv-aware) keeps per-request state: all of it released.
    policy = state.policy
    assert policy.name == "kv-aware"
    held = policy.request_state()  # type: ignore[attr-defined]
    assert held and all(v == (0, 0) for v in held.values())


async def test_unknown_route_and_wrong_method_in_openai_shape(router):
    r = await router()
    async with aiohttp.ClientSession() as s:
        async with s.get(r.url + "/nope") as resp:
            assert resp.status == 404
            assert _is_openai_error(await resp.json())
        async with s.get(r.url + "/v1/chat/completions") as resp:
            assert resp.status == 405
            assert _is_openai_error(await resp.json())
        async with s.get(r.url + "/health") as resp:
            assert resp.status == 200
