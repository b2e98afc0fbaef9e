"""A small, real aiohttp engine for router tests: speaks the OpenAI routes the way vLLM
does (same response shapes, SSE framing and error shape), records what it received, and
notices when a client goes away mid-stream."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from multidict import CIMultiDict


@dataclass
class EchoEngineState:
    name: str
    models: list[str]
    received: list[dict[str, Any]] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    headers: list[CIMultiDict[str]] = field(default_factory=list)
    cancelled: int = 0
    completed: int = 0
    active: int = 0
    fail_status: int | None = None  # answer every request with this status
    token_delay_s: float = 0.0
    drop_after: int | None = None  # close the connection after this many stream chunks
    # Error bodies in the flat {"object": "error", ...} shape of vLLM before 0.10, not
    # the nested {"error": {...}} shape of current vLLM.
    legacy_errors: bool = False


STATE: web.AppKey[EchoEngineState] = web.AppKey("echo_state", EchoEngineState)


def _error(status: int, message: str, legacy: bool = False) -> web.Response:
    err = {"message": message, "type": "BadRequestError", "param": None, "code": status}
    body = {"object": "error", **err} if legacy else {"error": err}
    return web.Response(status=status, body=orjson.dumps(body), content_type="application/json")


async def _models(request: web.Request) -> web.Response:
    st = request.app[STATE]
    data = [{"id": m, "object": "model", "owned_by": "vllm", "max_model_len": 4096}
            for m in st.models]
    return web.json_response({"object": "list", "data": data})


async def _generate(request: web.Request) -> web.StreamResponse:
    st = request.app[STATE]
    raw = await request.read()
    st.raw.append(raw)
    if request.content_type.startswith("multipart/"):
        st.headers.append(CIMultiDict(request.headers))
        st.completed += 1
        return web.json_response({"text": "transcribed"}, headers={"x-engine-name": st.name})
    body = orjson.loads(raw) if raw else {}
    st.received.append(body)
    st.headers.append(CIMultiDict(request.headers))
    if st.fail_status:
        return _error(st.fail_status, "injected failure", st.legacy_errors)
    if body.get("model") not in st.models:
        return _error(404, f"The model `{body.get('model')}` does not exist.",
                      st.legacy_errors)
    n = int(body.get("max_tokens") or 5)
    chat = request.path.endswith("/chat/completions")
    created = int(time.time())
    rid = "cmpl-" + request.headers.get("X-Request-Id", "x")
    if request.path.endswith("/embeddings"):
        st.completed += 1
        return web.json_response({
            "object": "list", "model": body["model"],
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}],
            "usage": {"prompt_tokens": 3, "total_tokens": 3},
        }, headers={"x-engine-name": st.name})
    if not body.get("stream"):
        text = " ".join(["tok"] * n)
        choice: dict[str, Any] = (
            {"index": 0, "message": {"role": "assistant", "content": text},
             "finish_reason": "length"}
            if chat else {"index": 0, "text": text, "finish_reason": "length"}
        )
        st.completed += 1
        return web.json_response({
            "id": rid, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": body["model"], "choices": [choice],
            "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n},
        }, headers={"x-engine-name": st.name})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                       "x-engine-name": st.name})
    await resp.prepare(request)
    st.active += 1
    try:
        for i in range(n):
            if st.drop_after is not None and i >= st.drop_after:
                assert request.transport is not None
                request.transport.close()  # the engine dies mid-stream
                return resp
            if st.token_delay_s:
                await asyncio.sleep(st.token_delay_s)
            delta: dict[str, Any] = (
                {"index": 0, "delta": {"content": f"tok{i} "}, "finish_reason": None}
                if chat else {"index": 0, "text": f"tok{i} ", "finish_reason": None}
            )
            chunk = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": created, "model": body["model"], "choices": [delta]}
            await resp.write(b"data: " + orjson.dumps(chunk) + b"\n\n")
        options = body.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage"):  # as vLLM: last
            await resp.write(b"data: " + orjson.dumps({
                "id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": created, "model": body["model"], "choices": [],
                "usage": {"prompt_tokens": 3, "completion_tokens": n,
                          "total_tokens": 3 + n}}) + b"\n\n")
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        st.completed += 1
    except (asyncio.CancelledError, ConnectionResetError):
        st.cancelled += 1
        raise
    finally:
        st.active -= 1
    return resp


async def _health(request: web.Request) -> web.Response:
    return web.Response(text="")


async def _metrics(request: web.Request) -> web.Response:
    st = request.app[STATE]
    text = (
        "# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{model_name="{st.models[0]}"}} {st.active}\n'
        "# TYPE vllm:num_requests_waiting gauge\n"
        f'vllm:num_requests_waiting{{model_name="{st.models[0]}"}} 0\n'
    )
    return web.Response(text=text, content_type="text/plain")


def build_echo_engine(name: str, models: list[str]) -> web.Application:
    app = web.Application()
    app[STATE] = EchoEngineState(name=name, models=models)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_post("/v1/chat/completions", _generate)
    app.router.add_post("/v1/completions", _generate)
    app.router.add_post("/v1/embeddings", _generate)
    app.router.add_post("/tokenize", _generate)
    app.router.add_post("/v1/audio/transcriptions", _generate)
    return app


# vLLM's API server (uvicorn, VLLM_HTTP_TIMEOUT_KEEP_ALIVE) closes a connection idle
# for 5 s: test engines do the same, so every test meets an engine that closes.
VLLM_KEEPALIVE_S = 5.0


class RunningServer:
    """An aiohttp app served on a free loopback port. `keepalive_s`: how long an idle
    client connection stays open (None: aiohttp's default, for routers)."""

    def __init__(self, app: web.Application, keepalive_s: float | None = None) -> None:
        self.app = app
        extra = {} if keepalive_s is None else {"keepalive_timeout": keepalive_s}
        self.runner = web.AppRunner(app, handler_cancellation=True, **extra)
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> RunningServer:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def close(self) -> None:
        await self.runner.cleanup()
