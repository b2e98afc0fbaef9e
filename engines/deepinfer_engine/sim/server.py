"""The simulated engine's HTTP server: vLLM's OpenAI API over the pure model.

All state hangs off the aiohttp application (`app[SIM_STATE]`), so several simulated
engines can share one process and event loop. The step loop (`SimState.run`) is the only
code reading the clock: it asks the engine for a step, sleeps until the step's modelled
end, applies it and wakes the handlers whose requests got tokens. An idle engine sleeps
on an event; a step costs O(requests in the step).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ipaddress
import logging
import math
import os
import random
import struct
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import orjson
import xxhash
from aiohttp import web

from deepinfer_router.shared.engine_record import Capacity, EngineRecord, KvEventsEndpoints
from deepinfer_router.shared.prompt_tokenizer import PromptTokenizer
from deepinfer_router.shared.tasks import cancel_and_wait

from .cost import CostModel
from .kv_publisher import KvPublisher
from .metrics import CONTENT_TYPE_HEADER, SimMetrics
from .model import Request, RequestTooLong, SimEngine, Step, draw_output_len
from .protocol import (
    ApiError,
    ChunkWriter,
    Generation,
    error_body,
    full_response,
    parse_any_prompt,
    parse_chat,
    parse_completion,
    parse_embedding,
)
from .settings import FAULT_FIELDS, SimSettings
from .tokenizer import token_id, token_ids_as_tokens

log = logging.getLogger("deepinfer.engine.sim")

# Steps may run late when the process is busy; within this lag the clock of the model
# carries on from the previous step's end (throughput as modelled), beyond it, it resyncs.
MAX_LAG_S = 0.05


def _version() -> str:
    try:
        return metadata.version("deepinfer") + "+sim"
    except metadata.PackageNotFoundError:  # pragma: no cover - not installed
        return "0.0.0+sim"


class _Flow:
    """A request's link between the step loop and its handler."""

    __slots__ = ("event", "first_token_time", "last_token_time", "sent", "stream")

    def __init__(self, stream: bool) -> None:
        self.event = asyncio.Event()
        self.stream = stream
        self.sent = 0  # output tokens already written
        self.first_token_time = 0.0
        self.last_token_time = 0.0


@dataclass(slots=True)
class _FaultPlan:
    error: bool = False
    hang: bool = False
    drop: bool = False
    stall: bool = False


class SimState:
    """One simulated engine: model, metrics, faults and the step loop."""

    def __init__(self, settings: SimSettings) -> None:
        self.settings = settings
        self.model_name = settings.model
        cost = CostModel.from_knobs(
            settings.step_overhead_ms, settings.prefill_us_per_token,
            settings.decode_us_per_seq, settings.decode_us_per_1k_context, settings.speed,
        )
        self.engine = SimEngine(
            num_blocks=settings.kv_blocks, block_size=settings.block_size,
            max_num_seqs=settings.max_num_seqs,
            max_num_batched_tokens=settings.max_num_batched_tokens,
            max_model_len=settings.effective_max_model_len(), cost=cost,
            scheduling_policy=settings.scheduling_policy,
        )
        self.metrics = SimMetrics(self.engine, settings.model)
        self.kv_events = settings.kv_events()
        # A real tokenizer, when given: prompts become its ids (as "\x00id" tokens)
        self.tokenizer = (PromptTokenizer.from_dir(settings.tokenizer)
                          if settings.tokenizer else None)
        self.publisher: KvPublisher | None = None
        self.faults: dict[str, Any] = {name: getattr(settings, name) for name in FAULT_FIELDS}
        self.rng = random.Random(settings.seed)
        self.version = _version()
        self.created = int(time.time())
        self._wake = asyncio.Event()
        self._last_arrival = 0.0
        self._task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        kv = self.kv_events
        if kv is not None:
            self.publisher = KvPublisher(kv.endpoint, kv.replay_endpoint, kv.topic,
                                         self.engine.block_size,
                                         self.settings.kv_events_encoding)
            self.publisher.start()
            self.engine.kv.events = []
        self._task = asyncio.create_task(self.run(), name=f"sim-steps-{self.model_name}")

    async def stop(self) -> None:
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        if self.publisher is not None:
            await self.publisher.close()
            self.publisher = None
        # wake every handler still waiting, so that none hangs on a dead loop
        engine = self.engine
        now = self.clock()
        for req in [*engine.running, *engine.waiting]:
            engine.abort(req, now)
            if isinstance(req.user_data, _Flow):
                req.user_data.event.set()

    def clock(self) -> float:
        loop = self._loop or asyncio.get_running_loop()
        return loop.time()

    # --- the step loop -------------------------------------------------------------------
    async def run(self) -> None:
        engine = self.engine
        loop = asyncio.get_running_loop()
        next_start: float | None = None
        while True:
            if not engine.has_work:
                self._wake.clear()
                await self._wake.wait()
                next_start = None
            now = loop.time()
            if next_start is None or now - next_start > MAX_LAG_S:
                start = now
            else:  # back to back; a request that arrived meanwhile cannot start earlier
                start = max(next_start, min(self._last_arrival, now))
            step = engine.schedule(start)
            if step is None:  # nothing schedulable (cannot last: blocks get freed)
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.01)
                next_start = None
                continue
            delay = step.end - loop.time()
            # sleep(0) still yields, so handlers run even when the model is ahead of us
            await asyncio.sleep(delay if delay > 0 else 0)
            self._deliver(step, engine.finish_step(step, step.end))
            events = engine.kv.events
            if events and self.publisher is not None:  # what the step cached and evicted
                self.publisher.publish(events)
                events.clear()
            next_start = step.end

    def _deliver(self, step: Step, reqs: list[Request]) -> None:
        metrics = self.metrics
        now = step.end
        for req in reqs:
            flow = req.user_data
            if not isinstance(flow, _Flow):
                continue
            if req.num_output == 1:
                flow.first_token_time = now
                metrics.ttft.observe(max(now - req.arrival_time, 0.0))
                if req.scheduled_time is not None:
                    metrics.queue_time.observe(max(req.scheduled_time - req.arrival_time, 0.0))
            else:
                metrics.itl.observe(now - flow.last_token_time)
            flow.last_token_time = now
            if req.finished:
                metrics.e2e.observe(max(now - req.arrival_time, 0.0))
                flow.event.set()
            elif flow.stream:
                flow.event.set()

    # --- requests ------------------------------------------------------------------------
    def submit(self, req_id: str, tokens: list[str], max_tokens: int | None, stream: bool,
               priority: int = 0) -> Request:
        """Queue a request; raises ApiError for what vLLM rejects."""
        engine = self.engine
        on_limit: Any = "length"
        if max_tokens is None:  # stands for generating until an end-of-sequence token
            room = engine.max_model_len - len(tokens)
            if room < 1:
                engine.check_length(len(tokens), 1)
            s = self.settings
            max_tokens = draw_output_len(self.rng, s.output_len_dist, s.output_len_mean,
                                         min(room, s.output_len_max))
            on_limit = "stop"
        now = self.clock()
        try:
            req = engine.new_request(req_id, tokens, max_tokens, now, on_limit, priority)
        except ValueError as exc:  # RequestTooLong included
            raise ApiError(str(exc)) from None
        req.user_data = _Flow(stream)
        self._last_arrival = now
        self._wake.set()
        return req

    def abort(self, req: Request) -> None:
        if not req.finished:
            self.engine.abort(req, self.clock())

    def plan_faults(self) -> _FaultPlan:
        f, rng = self.faults, self.rng
        plan = _FaultPlan()
        if f["fault_error_rate"] > 0 and rng.random() < f["fault_error_rate"]:
            plan.error = True
        if f["fault_hang_rate"] > 0 and rng.random() < f["fault_hang_rate"]:
            plan.hang = True
        if f["fault_drop_rate"] > 0 and rng.random() < f["fault_drop_rate"]:
            plan.drop = True
        if f["fault_stall_rate"] > 0 and rng.random() < f["fault_stall_rate"]:
            plan.stall = True
        return plan

    def update_faults(self, changes: dict[str, Any]) -> dict[str, Any]:
        unknown = sorted(set(changes) - set(FAULT_FIELDS))
        if unknown:
            raise ApiError(f"unknown fault field(s): {', '.join(unknown)}; "
                           f"known: {', '.join(FAULT_FIELDS)}")
        merged = {**self.settings.model_dump(), **self.faults, **changes}
        try:
            checked = SimSettings.model_validate(merged)
        except ValueError as exc:
            raise ApiError(f"invalid faults: {exc}".splitlines()[0]) from None
        self.faults = {name: getattr(checked, name) for name in FAULT_FIELDS}
        return dict(self.faults)


SIM_STATE = web.AppKey("sim_state", SimState)


# --- helpers -----------------------------------------------------------------------------
def _json(data: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _error(exc: ApiError) -> web.Response:
    return web.Response(body=exc.body(), status=exc.status, content_type="application/json")


async def _body(request: web.Request) -> Any:
    raw = await request.read()
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ApiError(f"Invalid JSON body: {exc}") from None


def _check_model(state: SimState, model: str | None) -> None:
    if model is not None and model != state.model_name:
        raise ApiError(f"The model `{model}` does not exist.", 404, "NotFoundError", "model")


def _is_loopback(request: web.Request) -> bool:
    try:
        address = ipaddress.ip_address(request.remote or "")
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _drop_connection(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()  # no FIN dance: the client sees a reset connection


# --- OpenAI routes ------------------------------------------------------------------------
async def chat_completions(request: web.Request) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    try:
        body = await _body(request)
        gen = retokenized(state, body, parse_chat(body))
        _check_model(state, gen.model)
    except ApiError as exc:
        return _error(exc)
    return await _generate(request, state, gen, "chatcmpl-")


async def completions(request: web.Request) -> web.StreamResponse:
    state = request.app[SIM_STATE]
    try:
        body = await _body(request)
        gen = retokenized(state, body, parse_completion(body))
        _check_model(state, gen.model)
    except ApiError as exc:
        return _error(exc)
    return await _generate(request, state, gen, "cmpl-")


async def _generate(request: web.Request, state: SimState, gen: Generation, prefix: str
                    ) -> web.StreamResponse:
    plan = state.plan_faults()
    if plan.error:
        return web.Response(
            body=error_body("Simulated engine failure (fault injection).",
                            "InternalServerError", 500),
            status=500, content_type="application/json",
        )
    req_id = prefix + uuid.uuid4().hex
    try:  # validate lengths before answering anything, as vLLM does
        if gen.max_tokens is not None:
            state.engine.check_length(len(gen.tokens), gen.max_tokens)
    except RequestTooLong as exc:
        return _error(ApiError(str(exc)))

    resp: web.StreamResponse | None = None
    if gen.stream:  # vLLM answers the headers at once and streams tokens as they come
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
        await resp.prepare(request)
    delay = state.faults["fault_ttft_delay_s"]
    if delay > 0:
        await asyncio.sleep(delay)
    if plan.hang:
        await asyncio.Event().wait()  # until the client goes away (handler cancelled)

    try:
        req = state.submit(req_id, gen.tokens, gen.max_tokens, gen.stream, gen.priority)
    except ApiError as exc:
        if resp is None:
            return _error(exc)
        await resp.write(b"data: " + exc.body() + b"\n\ndata: [DONE]\n\n")
        return resp
    flow = req.user_data
    assert isinstance(flow, _Flow)
    drop_after = state.faults["fault_drop_after_tokens"] if plan.drop else -1
    stall_after = state.faults["fault_stall_after_tokens"] if plan.stall else -1
    try:
        if resp is not None:
            await _stream(request, resp, state, gen, req, flow, drop_after, stall_after)
            return resp
        while not req.finished:
            await flow.event.wait()
            flow.event.clear()
        if plan.drop or req.finish_reason == "abort":
            _drop_connection(request)
            return web.Response(status=500)
        return _json(full_response(
            gen, req_id, state.model_name, req.output_text(), req.finish_reason or "stop",
            req.num_prompt, req.num_output, req.num_cached_tokens,
        ))
    except ConnectionResetError:  # the client went away mid-stream
        return resp if resp is not None else web.Response(status=499)
    finally:
        # finished: nothing to do; cancelled (client gone) or failed: free the sequence
        # and its blocks at once
        state.abort(req)


async def _stream(request: web.Request, resp: web.StreamResponse, state: SimState,
                  gen: Generation, req: Request, flow: _Flow, drop_after: int,
                  stall_after: int = -1) -> None:
    writer = ChunkWriter(gen.kind, req.id, state.model_name)
    tokens = req.all_tokens
    base = req.num_prompt
    while True:
        await flow.event.wait()
        flow.event.clear()
        n = req.num_output
        if flow.sent < n:
            parts: list[bytes] = []
            if flow.sent == 0 and gen.kind == "chat":
                parts.append(writer.role())
            last = n - 1 if req.finished else -1
            for i in range(flow.sent, n):
                if i == drop_after:
                    if parts:
                        await resp.write(b"".join(parts))
                    state.abort(req)
                    _drop_connection(request)
                    return
                if i == stall_after:
                    if parts:
                        await resp.write(b"".join(parts))
                    # the answer goes silent with the connection open (the model still
                    # finishes the sequence) until the client goes away and the handler
                    # is cancelled
                    await asyncio.Event().wait()
                parts.append(writer.token(tokens[base + i],
                                          req.finish_reason if i == last else None))
            flow.sent = n
            await resp.write(b"".join(parts))
        if req.finished:
            break
    if req.finish_reason == "abort":  # the engine stopped under us
        return
    timing = None
    if state.settings.report_engine_ttft:
        # queue + prefill as modelled, in model seconds (benchmarks/routing.py counts the
        # rest of a client's TTFT, the router's included, at wall-clock speed)
        timing = {"engine_ttft_s": max(flow.first_token_time - req.arrival_time, 0.0)
                  * state.settings.speed}
    tail = [writer.usage(req.num_prompt, req.num_output, req.num_cached_tokens, timing)] \
        if gen.include_usage else []
    tail.append(writer.done())
    await resp.write(b"".join(tail))
    await resp.write_eof()


async def embeddings(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    try:
        model, inputs, encoding, dims = parse_embedding(await _body(request))
        _check_model(state, model)
        for tokens in inputs:
            state.engine.check_length(len(tokens), 0)
    except RequestTooLong as exc:
        return _error(ApiError(str(exc)))
    except ApiError as exc:
        return _error(exc)
    dim = dims or state.settings.embedding_dim
    data = []
    total = 0
    for index, tokens in enumerate(inputs):
        total += len(tokens)
        vector = _embed(tokens, dim)
        value: Any = vector
        if encoding == "base64":
            value = base64.b64encode(struct.pack(f"<{dim}f", *vector)).decode()
        data.append({"index": index, "object": "embedding", "embedding": value})
    return _json({
        "id": "embd-" + uuid.uuid4().hex, "object": "list", "created": int(time.time()),
        "model": state.model_name, "data": data,
        "usage": {"prompt_tokens": total, "total_tokens": total, "completion_tokens": 0,
                  "prompt_tokens_details": None},
    })


def _embed(tokens: list[str], dim: int) -> list[float]:
    """A deterministic unit vector: equal inputs embed equally."""
    seed = xxhash.xxh64_intdigest("\x1f".join(tokens).encode())
    rng = random.Random(seed)
    vec = [rng.gauss(0.0, 1.0) for _ in range(dim)]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


async def models(request: web.Request) -> web.Response:
    state = request.app[SIM_STATE]
    name = state.model_name
    return _json({"object": "list", "data": [{
        "id": name, "object": "model", "created": state.created, "owned_by": "vllm",
        "root": name, "parent": None, "max_model_len": state.engine.max_model_len,
        "permission": [{
            "id": "modelperm-" + xxhash.xxh64_hexdigest(name.encode()),
            "object": "model_permission", "created": state.created, "allow_create_engine": False,
            "allow_sampling": True, "allow_logprobs": True, "allow_search_indices": False,
            "allow_view": True, "allow_fine_tuning": False, "organization": "*", "group": None,
            "is_blocking": False,
        }],
    }]})


async def tokenize_route(request: web.Request) -> web.Response:
    """vLLM's /tokenize: count and ids of a chat or completion prompt."""
    state = request.app[SIM_STATE]
    try:
        body = await _body(request)
        tokens = parse_any_prompt(body)
        if state.tokenizer is not None and (ids := state.tokenizer.prompt_ids(body)):
            tokens = token_ids_as_tokens(ids)
        _check_model(state, body.get("model"))
    except ApiError as exc:
        return _error(exc)
    ids = [token_id(t) for t in tokens]
    return _json({"count": len(ids), "max_model_len": state.engine.max_model_len,
                  "tokens": ids, "token_strs": None})


def retokenized(state: SimState, body: Any, gen: Generation) -> Generation:
    """With a real tokenizer, the prompt as its ids (where it can render the request;
    else the stand-in's pieces)."""
    if state.tokenizer is not None and isinstance(body, dict):
        ids = state.tokenizer.prompt_ids(body)
        if ids:
            gen.tokens = token_ids_as_tokens(ids)
    return gen


# --- operations -------------------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    return web.Response(status=200)


async def version(request: web.Request) -> web.Response:
    return _json({"version": request.app[SIM_STATE].version})


async def metrics_route(request: web.Request) -> web.Response:
    body = request.app[SIM_STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_HEADER})


async def cached_tokens(request: web.Request) -> web.Response:
    """Benchmark oracle: prompt tokens of a chat/completion body this engine would find in
    its prefix cache if the request arrived now (nothing is run or touched)."""
    state = request.app[SIM_STATE]
    try:
        body = await _body(request)
        tokens = parse_any_prompt(body)
        if state.tokenizer is not None and (ids := state.tokenizer.prompt_ids(body)):
            tokens = token_ids_as_tokens(ids)
    except ApiError as exc:
        return _error(exc)
    engine = state.engine
    return _json({"cached_tokens": engine.cached_prefix_tokens(tokens),
                  "prompt_tokens": len(tokens), "block_size": engine.block_size})


async def faults_route(request: web.Request) -> web.Response:
    if not _is_loopback(request):
        return web.Response(body=error_body("/admin answers loopback clients only.",
                                            "PermissionDeniedError", 403),
                            status=403, content_type="application/json")
    state = request.app[SIM_STATE]
    if request.method == "POST":
        try:
            body = await _body(request)
            if not isinstance(body, dict):
                raise ApiError("The request body must be a JSON object.")
            return _json(state.update_faults(body))
        except ApiError as exc:
            return _error(exc)
    return _json(dict(state.faults))


# --- app ------------------------------------------------------------------------------
def build_sim_app(settings: SimSettings) -> web.Application:
    """The simulated engine as an aiohttp app; its step loop runs while the app does.
    Serve it with `handler_cancellation=True` (as start_sim_server does) so that a client
    that disconnects frees its sequence at once rather than at its next token."""
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[SIM_STATE] = SimState(settings)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/tokenize", tokenize_route)
    app.router.add_get("/health", health)
    app.router.add_get("/ping", health)
    app.router.add_get("/version", version)
    app.router.add_get("/metrics", metrics_route)
    app.router.add_post("/debug/cached_tokens", cached_tokens)
    app.router.add_get("/admin/faults", faults_route)
    app.router.add_post("/admin/faults", faults_route)

    async def _lifecycle(app: web.Application) -> Any:
        await app[SIM_STATE].start()
        yield
        await app[SIM_STATE].stop()

    app.cleanup_ctx.append(_lifecycle)
    return app


def _advertised_url(settings: SimSettings, host: str, port: int) -> str:
    if settings.advertise_url:
        return settings.advertise_url
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


class SimServer:
    """A running simulated engine (see start_sim_server)."""

    def __init__(self, app: web.Application, runner: web.AppRunner, host: str, port: int,
                 url: str) -> None:
        self.app = app
        self.port = port
        self.host = host
        self.url = url
        self.started_at = time.time()
        self.instance = uuid.uuid4().hex[:16]
        self._runner = runner
        self._registrar: Any = None

    @property
    def state(self) -> SimState:
        return self.app[SIM_STATE]

    @property
    def settings(self) -> SimSettings:
        return self.state.settings

    def record(self) -> EngineRecord:
        engine = self.state.engine
        return EngineRecord(
            url=self.url, instance=self.instance, models=[self.state.model_name],
            capacity=Capacity(kv_blocks=engine.kv.num_blocks, block_size=engine.block_size,
                              max_model_len=engine.max_model_len,
                              max_num_seqs=engine.max_num_seqs),
            labels={"engine": "sim"}, version=self.state.version,
            kv_events=self._kv_events_record(), tokenizer=self._tokenizer_dir(),
            started_at=self.started_at,
            heartbeat_at=time.time(),
        )

    def _tokenizer_dir(self) -> str | None:
        path = self.settings.tokenizer
        return os.path.abspath(path) if path else None

    def _kv_events_record(self) -> KvEventsEndpoints | None:
        """The feed as routers subscribe to it: only a concrete tcp address (a wildcard
        or an ipc path is for launch's relay, which registers the engine itself)."""
        kv = self.state.kv_events
        if kv is None or not kv.endpoint.startswith("tcp://") or "*" in kv.endpoint:
            return None
        return KvEventsEndpoints(endpoint=kv.endpoint, replay_endpoint=kv.replay_endpoint,
                                 topic=kv.topic)

    async def register(self) -> None:
        """Register with settings.registry (if set) and keep heart-beating."""
        if not self.settings.registry or self._registrar is not None:
            return
        registrar = self.settings.make_registrar()
        await registrar.start(self.record())
        self._registrar = registrar

    async def close(self) -> None:
        if self._registrar is not None:
            registrar, self._registrar = self._registrar, None
            try:
                await registrar.stop()
            except Exception as exc:  # a failed deregistration must not block the stop
                log.warning("deregistration failed: %s", exc)
        await self._runner.cleanup()


async def start_sim_server(settings: SimSettings, host: str = "127.0.0.1", port: int = 0,
                           *, register: bool = True) -> SimServer:
    """Start a simulated engine in this event loop; port 0 picks a free port. With
    settings.registry set (and register=True) it registers and heart-beats until close()."""
    app = build_sim_app(settings)
    # handler_cancellation: a client that disconnects cancels its handler, which frees the
    # sequence and its blocks at once (aiohttp >= 3.9 no longer does it by default)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None,
                           keepalive_timeout=settings.keepalive_s)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    addresses = runner.addresses
    actual = int(addresses[0][1]) if addresses else port
    sim = SimServer(app, runner, host, actual, _advertised_url(settings, host, actual))
    if register:
        try:
            await sim.register()
        except BaseException:
            await runner.cleanup()
            raise
    return sim
