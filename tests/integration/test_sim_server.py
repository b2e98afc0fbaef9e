# mypy: disable-error-code="arg-type,call-overload,union-attr"
# (the openai SDK types messages as TypedDicts; plain dicts are what users send)
"""The simulated engine over HTTP, driven by the real `openai` client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from unittest import mock

import aiohttp
import openai
import orjson
import pytest
from aiohttp.test_utils import make_mocked_request
from prometheus_client.parser import text_string_to_metric_families

from deepinfer_engine.sim.server import SIM_STATE, SimServer, _is_loopback, start_sim_server
from deepinfer_engine.sim.settings import SimSettings
from tests.support.waiting import wait_until

pytestmark = pytest.mark.timeout(60)

LONG_SYSTEM = "You are a careful assistant who answers in full sentences. " * 200


def sim_settings(**kw: object) -> SimSettings:
    base: dict = {"model": "sim-model", "kv_blocks": 4096, "speed": 50.0, "seed": 1}
    base.update(kw)
    return SimSettings.model_validate(base)


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    server = await start_sim_server(sim_settings())
    yield server
    await server.close()


def client(server: SimServer, **kw: object) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0,
                              **kw)  # type: ignore[arg-type]


async def scrape(server: SimServer) -> dict[str, dict[tuple, float]]:
    """Samples by name, keyed by their sorted labels."""
    async with aiohttp.ClientSession() as s, s.get(server.url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def one(samples: dict[str, dict[tuple, float]], name: str) -> float:
    values = list(samples[name].values())
    assert len(values) == 1, values
    return values[0]


async def test_chat_completion_non_streaming(sim: SimServer) -> None:
    async with client(sim) as c:
        r = await c.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": "Hello there"}],
            max_tokens=7,
        )
    assert r.object == "chat.completion"
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.role == "assistant"
    assert r.usage is not None and r.usage.completion_tokens == 7
    assert r.usage.prompt_tokens > 3
    assert r.usage.total_tokens == r.usage.prompt_tokens + 7
    assert r.choices[0].message.content and len(r.choices[0].message.content.split()) == 7


async def test_chat_streaming_one_chunk_per_token_with_usage(sim: SimServer) -> None:
    async with client(sim) as c:
        stream = await c.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": "Stream please"}],
            max_tokens=9, stream=True, stream_options={"include_usage": True},
        )
        chunks = [chunk async for chunk in stream]
    content = [ch for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert len(content) == 9
    assert chunks[0].choices[0].delta.role == "assistant"
    assert content[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 9


async def test_engine_ttft_is_reported_only_when_asked() -> None:
    """--report-engine-ttft (benchmarks): the usage chunk carries the modelled queue +
    prefill time in model seconds; by default the answer is vLLM's shape, without it."""
    for report in (True, False):
        server = await start_sim_server(sim_settings(report_engine_ttft=report, speed=10.0))
        try:
            body = {"model": "sim-model", "prompt": "word " * 400, "max_tokens": 2,
                    "stream": True, "stream_options": {"include_usage": True}}
            async with aiohttp.ClientSession() as s, \
                    s.post(server.url + "/v1/completions", json=body) as resp:
                events = [orjson.loads(line[6:]) async for line in resp.content
                          if line.startswith(b"data: {")]
        finally:
            await server.close()
        last = events[-1]
        assert last["usage"]["prompt_tokens"] > 400
        if report:  # ~400 tokens at 40 us each plus a step: a few model ms
            assert 0.005 < last["x_sim_timing"]["engine_ttft_s"] < 1.0, last
        else:
            assert "x_sim_timing" not in last


async def test_stream_without_usage_and_raw_sse_shape(sim: SimServer) -> None:
    body = {"model": "sim-model", "prompt": "once upon a time", "max_tokens": 3, "stream": True}
    async with aiohttp.ClientSession() as s, \
            s.post(sim.url + "/v1/completions", json=body) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        raw = await resp.text()
    events = [e for e in raw.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert len(events) == 4 and events[-1] == "data: [DONE]"
    assert '"usage"' not in raw


async def test_completions_streaming_and_token_id_prompt(sim: SimServer) -> None:
    async with client(sim) as c:
        r = await c.completions.create(model="sim-model", prompt="Say something", max_tokens=4)
        assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
        assert r.usage is not None and r.usage.completion_tokens == 4
        stream = await c.completions.create(model="sim-model", prompt=[1, 2, 3, 4, 5],
                                            max_tokens=5, stream=True,
                                            stream_options={"include_usage": True})
        chunks = [chunk async for chunk in stream]
    texts = [ch.choices[0].text for ch in chunks if ch.choices]
    assert len(texts) == 5
    assert chunks[-1].usage is not None and chunks[-1].usage.prompt_tokens == 5


async def test_output_length_drawn_when_max_tokens_absent(sim: SimServer) -> None:
    async with client(sim) as c:
        r = await c.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": "free length"}])
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and 1 <= r.usage.completion_tokens <= 4096


async def test_models_embeddings_health_version(sim: SimServer) -> None:
    async with client(sim) as c:
        models = await c.models.list()
        emb = await c.embeddings.create(model="sim-model", input=["a b c", "a b c", "d"])
    assert [m.id for m in models.data] == ["sim-model"]
    assert models.data[0].model_extra["max_model_len"] == 32768  # type: ignore[index]
    vectors = [d.embedding for d in emb.data]
    assert len(vectors) == 3 and len(vectors[0]) == 256
    assert vectors[0] == vectors[1] != vectors[2]
    assert abs(sum(v * v for v in vectors[0]) - 1.0) < 1e-6
    async with aiohttp.ClientSession() as s:
        async with s.get(sim.url + "/health") as resp:
            assert resp.status == 200
        async with s.get(sim.url + "/version") as resp:
            assert "sim" in (await resp.json())["version"]


async def test_prefix_cache_hit_counter_rises_and_ttft_falls() -> None:
    # speed 4 keeps the modelled difference (~50 ms vs ~2 ms) far above scheduling noise
    server = await start_sim_server(sim_settings(speed=4.0))
    try:
        messages = [{"role": "system", "content": LONG_SYSTEM},
                    {"role": "user", "content": "First question?"}]

        async def ttft(c: openai.AsyncOpenAI, msgs: list[dict]) -> float:
            start = time.perf_counter()
            stream = await c.chat.completions.create(model="sim-model", messages=msgs,
                                                     max_tokens=3, stream=True)
            first = None
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].delta.content:
                    first = time.perf_counter() - start
            assert first is not None
            return first

        async with client(server) as c:
            await c.models.list()  # open the connection first: time only the engine
            t1 = await ttft(c, messages)
            before = await scrape(server)
            t2 = await ttft(c, [*messages[:1], {"role": "user", "content": "Second one?"}])
            after = await scrape(server)
        hits = "vllm:prefix_cache_hits_total"
        queries = "vllm:prefix_cache_queries_total"
        assert one(before, hits) == 0
        assert one(after, hits) > 2000
        assert one(after, queries) > one(before, queries)
        assert t2 < t1 / 2, (t1, t2)
        ttft_count = "vllm:time_to_first_token_seconds_count"
        assert one(after, ttft_count) == 2
    finally:
        await server.close()


async def test_usage_reports_cached_tokens_and_oracle_agrees(sim: SimServer) -> None:
    body = {"model": "sim-model", "messages": [{"role": "system", "content": LONG_SYSTEM},
                                               {"role": "user", "content": "q"}]}
    async with aiohttp.ClientSession() as s:
        async with s.post(sim.url + "/debug/cached_tokens", json=body) as resp:
            empty = await resp.json()
        assert empty["cached_tokens"] == 0 and empty["block_size"] == 16
        async with client(sim) as c:
            await c.chat.completions.create(max_tokens=2, **body)  # type: ignore[arg-type]
            async with s.post(sim.url + "/debug/cached_tokens", json=body) as resp:
                oracle = await resp.json()
            r = await c.chat.completions.create(max_tokens=2, **body)  # type: ignore[arg-type]
    assert r.usage is not None and r.usage.prompt_tokens_details is not None
    assert oracle["cached_tokens"] == r.usage.prompt_tokens_details.cached_tokens > 0
    assert oracle["prompt_tokens"] == r.usage.prompt_tokens
    assert oracle["cached_tokens"] == (oracle["prompt_tokens"] - 1) // 16 * 16


async def test_metrics_parse_and_carry_every_vllm_name(sim: SimServer) -> None:
    async with client(sim) as c:
        await c.chat.completions.create(model="sim-model", max_tokens=3,
                                        messages=[{"role": "user", "content": "x"}])
    samples = await scrape(sim)
    for name in (
        "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
        "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
        "vllm:cache_config_info", "vllm:time_to_first_token_seconds_bucket",
        "vllm:inter_token_latency_seconds_bucket", "vllm:e2e_request_latency_seconds_bucket",
        "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
        "vllm:request_success_total",
    ):
        assert name in samples, name
        for labels in samples[name]:
            assert ("model_name", "sim-model") in labels
    (info_labels,) = samples["vllm:cache_config_info"]
    info = dict(info_labels)
    assert info["block_size"] == "16" and info["num_gpu_blocks"] == "4096"
    assert samples["vllm:cache_config_info"][info_labels] == 1.0
    assert one(samples, "vllm:generation_tokens_total") == 3
    success = {dict(k)["finished_reason"]: v for k, v in
               samples["vllm:request_success_total"].items()}
    assert success["length"] == 1
    assert one(samples, "vllm:inter_token_latency_seconds_count") == 2
    assert one(samples, "vllm:num_requests_running") == 0
    assert one(samples, "vllm:kv_cache_usage_perc") == 0.0


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"model": "sim-model"}, "messages"),
        ({"model": "sim-model", "messages": "hello"}, "messages"),
        ({"model": "sim-model", "messages": [{"content": "no role"}]}, "role"),
        ({"model": "sim-model", "messages": [{"role": "user", "content": "x"}],
          "max_tokens": 0}, "max_tokens"),
        ({"model": "sim-model", "messages": [{"role": "user", "content": "x"}],
          "max_tokens": "many"}, "max_tokens"),
        ({"model": "sim-model", "messages": [{"role": "user", "content": "x"}],
          "max_tokens": 10**6}, "maximum context length"),
    ],
)
async def test_chat_validation_answers_400(sim: SimServer, body: dict, fragment: str) -> None:
    async with aiohttp.ClientSession() as s, \
            s.post(sim.url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 400
        err = (await resp.json())["error"]
    assert (err["type"], err["code"], err["param"]) == ("BadRequestError", 400, None)
    assert fragment in err["message"]


async def test_completion_validation_and_bad_json(sim: SimServer) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(sim.url + "/v1/completions", json={"max_tokens": 3}) as resp:
            assert resp.status == 400
            assert "prompt" in (await resp.json())["error"]["message"]
        async with s.post(sim.url + "/v1/completions", data=b"{not json") as resp:
            assert resp.status == 400
            assert (await resp.json())["error"]["type"] == "BadRequestError"


async def test_openai_client_errors_and_unknown_fields(sim: SimServer) -> None:
    async with client(sim) as c:
        with pytest.raises(openai.NotFoundError):
            await c.chat.completions.create(model="other",
                                            messages=[{"role": "user", "content": "x"}])
        with pytest.raises(openai.BadRequestError):
            await c.chat.completions.create(model="sim-model", messages=[], max_tokens=2)
        r = await c.chat.completions.create(
            model="sim-model", messages=[{"role": "user", "content": "x"}], max_tokens=2,
            extra_body={"top_k": 5, "guided_json": {"type": "object"}, "made_up": [1]},
        )
    assert r.usage is not None and r.usage.completion_tokens == 2


async def test_faults_error_slow_drop_hang(sim: SimServer) -> None:
    msgs = [{"role": "user", "content": "fault me"}]
    async with aiohttp.ClientSession() as s:
        async def set_faults(**kw: object) -> dict:
            async with s.post(sim.url + "/admin/faults", json=kw) as resp:
                assert resp.status == 200, await resp.text()
                return await resp.json()

        async with client(sim) as c:
            await set_faults(fault_error_rate=1.0)
            with pytest.raises(openai.InternalServerError):
                await c.chat.completions.create(model="sim-model", messages=msgs, max_tokens=2)

            await set_faults(fault_error_rate=0.0, fault_ttft_delay_s=0.3)
            start = time.perf_counter()
            await c.chat.completions.create(model="sim-model", messages=msgs, max_tokens=2)
            assert time.perf_counter() - start >= 0.3

            await set_faults(fault_ttft_delay_s=0.0, fault_drop_rate=1.0,
                             fault_drop_after_tokens=2)
            got: list[str] = []
            with pytest.raises(openai.APIError):
                stream = await c.chat.completions.create(model="sim-model", messages=msgs,
                                                         max_tokens=50, stream=True)
                async for chunk in stream:
                    if chunk.choices and chunk.choices[0].delta.content:
                        got.append(chunk.choices[0].delta.content)
            assert len(got) == 2

        faults = await set_faults(fault_drop_rate=0.0, fault_hang_rate=1.0)
        assert faults["fault_hang_rate"] == 1.0
        async with client(sim, timeout=0.5) as c:
            with pytest.raises(openai.APITimeoutError):
                await c.chat.completions.create(model="sim-model", messages=msgs, max_tokens=2)
        await set_faults(fault_hang_rate=0.0)
        async with client(sim) as c:
            await c.chat.completions.create(model="sim-model", messages=msgs, max_tokens=2)

        async with s.post(sim.url + "/admin/faults", json={"fault_error_rate": 2}) as resp:
            assert resp.status == 400
        async with s.post(sim.url + "/admin/faults", json={"nope": 1}) as resp:
            assert resp.status == 400
        async with s.get(sim.url + "/admin/faults") as resp:
            assert (await resp.json())["fault_error_rate"] == 0.0
    engine = sim.state.engine
    await wait_until(lambda: not engine.has_work)
    assert engine.kv.num_free == engine.kv.num_blocks


def test_admin_faults_answer_loopback_only() -> None:
    def req(peer: str) -> object:
        transport = mock.Mock()
        transport.get_extra_info.return_value = (peer, 1234)
        return make_mocked_request("POST", "/admin/faults", transport=transport)

    assert _is_loopback(req("127.0.0.1"))  # type: ignore[arg-type]
    assert _is_loopback(req("::1"))  # type: ignore[arg-type]
    assert not _is_loopback(req("10.1.2.3"))  # type: ignore[arg-type]


async def test_disconnect_frees_sequence_and_blocks() -> None:
    server = await start_sim_server(sim_settings(speed=1.0))
    engine = server.state.engine
    body = {"model": "sim-model", "max_tokens": 5000, "stream": True,
            "messages": [{"role": "system", "content": LONG_SYSTEM},
                         {"role": "user", "content": "long answer"}]}
    try:
        async with aiohttp.ClientSession() as s:
            async with s.post(server.url + "/v1/chat/completions", json=body) as resp:
                await resp.content.readuntil(b"\n\n")
                await resp.content.readuntil(b"\n\n")
                assert engine.num_running == 1 and engine.kv.num_free < engine.kv.num_blocks
                resp.close()  # drop the connection mid-stream
            await wait_until(lambda: engine.num_running == 0)
            assert engine.kv.num_free == engine.kv.num_blocks
            assert engine.stats.finished["abort"] == 1
            # a non-streaming client that gives up
            body["stream"] = False
            with pytest.raises(asyncio.TimeoutError):
                async with s.post(server.url + "/v1/chat/completions", json=body,
                                  timeout=aiohttp.ClientTimeout(total=0.3)):
                    pass
            await wait_until(lambda: engine.num_running == 0)
            assert engine.kv.num_free == engine.kv.num_blocks
            assert engine.stats.finished["abort"] == 2
    finally:
        await server.close()


async def test_several_sims_share_one_loop_with_separate_state() -> None:
    a = await start_sim_server(sim_settings(model="m-a"))
    b = await start_sim_server(sim_settings(model="m-b", kv_blocks=1024))
    try:
        assert a.port != b.port and a.url != b.url
        assert a.app[SIM_STATE] is not b.app[SIM_STATE]
        async with client(a) as ca, client(b) as cb:
            await asyncio.gather(*(
                ca.chat.completions.create(model="m-a", max_tokens=3,
                                           messages=[{"role": "user", "content": f"q{i}"}])
                for i in range(20)
            ), cb.completions.create(model="m-b", prompt="hello", max_tokens=2))
        sa, sb = await scrape(a), await scrape(b)
        assert one(sa, "vllm:generation_tokens_total") == 60
        assert one(sb, "vllm:generation_tokens_total") == 2
        ra, rb = a.record(), b.record()
        assert ra.id != rb.id and ra.models == ["m-a"]
        assert rb.capacity.kv_blocks == 1024 and rb.capacity.block_size == 16
        assert rb.capacity.max_num_seqs == 256 and rb.capacity.max_model_len == 16384
    finally:
        await a.close()
        await b.close()


async def test_concurrent_load_is_batched() -> None:
    """Many requests at once run in one batch: the engine takes about as many steps as
    one request would, not fifty times as many."""
    server = await start_sim_server(sim_settings(speed=10.0))
    try:
        async with client(server) as c:
            await asyncio.gather(*(
                c.chat.completions.create(model="sim-model", max_tokens=20,
                                          messages=[{"role": "user", "content": f"q{i}"}])
                for i in range(50)
            ))
        # one sequence alone: 21 steps (prefill + 20 decodes); 50 one after another: ~1000
        assert server.state.engine.stats.steps < 200
    finally:
        await server.close()
