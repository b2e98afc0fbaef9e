"""Application wiring: build the aiohttp app from settings, start and stop its services."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable

from aiohttp import web

from .admission import Admission
from .api import admin, deployments, health, metrics, models
from .budgets.factory import make_budget_gate
from .budgets.owner import BUDGET_PATH, receive_budget
from .decision_log import DecisionLog
from .engine_clients import EngineClients
from .errors import error_response
from .fairness.queue import FairQueue
from .fleet import Fleet
from .health_checks import HealthChecker
from .loop_lag import LoopLagProbe
from .metrics import RouterMetrics
from .proxy import Proxy, max_body_bytes
from .registry.base import RefusalLog, RegistrySource, WritableRegistry
from .registry.local import LocalRegistry
from .registry.static import StaticRegistry
from .routing.estimate_correction import EstimateCorrection
from .routing.factory import make_policy
from .scrape import Scraper
from .service import Closing, Service
from .settings import RouterSettings
from .state import STATE, RouterState
from .workers.siblings import (
    SIBLINGS,
    STATE_PATH,
    SYNC_PATH,
    WORKER_SLOT,
    Handler,
    Siblings,
    SiblingSync,
    ask_siblings_on_404,
    gather_metrics,
    name_worker,
    receive_sync,
    replicate_writes,
    send_state,
)
from .workers.slot import WorkerSlot, split

log = logging.getLogger("deepinfer.app")

# JSON routes that carry a `model` and go to an engine serving it, besides /v1/*.
VLLM_ROUTES = ("/tokenize", "/detokenize", "/pooling", "/score", "/rerank", "/classify")


def build_app(settings: RouterSettings, slot: WorkerSlot | None = None) -> web.Application:
    """The router's app; as one of --workers (`slot`), with its share of the router-wide
    limits and the routes and services that keep it in step with its siblings."""
    if slot is not None:
        settings = worker_settings(settings, slot)
    app = web.Application(client_max_size=max_body_bytes(settings.max_body_mb))
    fleet = Fleet(
        chars_per_token=settings.chars_per_token,
        default_kv_tokens=settings.default_engine_kv_tokens,
        stale_after_s=settings.scrape_stale_s,
        eject_after_failures=settings.eject_after_failures,
        eject_cooldown_s=settings.eject_cooldown_s,
        allow_private_urls=settings.allow_private_engine_urls,
        first_byte_timeout_s=settings.first_byte_timeout_s,
        max_inflight_per_engine=settings.max_inflight_per_engine,
    )
    # In a shared fleet, the policy keeps its recent placements for the other routers
    # (through Redis) or the other workers (through their sockets).
    sharing = bool(settings.redis_url and settings.share_hints) or slot is not None
    policy = make_policy(settings, hint_outbox=4096 if sharing else 0)
    fleet.on_forget(policy.forget_engine)
    router_metrics = RouterMetrics()
    router_metrics.watch_fleet(
        lambda: [(s.id, s.inflight) for s in fleet.engines.values()],
        lambda: fleet.state_counts(time.monotonic()),
    )
    router_metrics.watch_routing(policy.state_sizes)
    tenant_table = settings.tenant_table()
    classes = tenant_table.classes
    state = RouterState(
        settings=settings,
        fleet=fleet,
        policy=policy,
        metrics=router_metrics,
        # Aging fast enough that the lowest class is served before --queue-timeout-s.
        admission=Admission(settings.max_inflight, settings.max_queue, settings.queue_timeout_s,
                            FairQueue(classes, tenant_table.weights(), aging_s=max(
                                0.1, settings.queue_timeout_s / (2 * len(classes))),
                                      order=settings.queue_order),
                            class_reserve=settings.class_reserve),
        decisions=DecisionLog(settings.decision_log_size, settings.chars_per_token)
        if settings.decision_log_size else None,
    )
    if state.decisions is not None and settings.kv_events != "off":
        state.estimate_correction = EstimateCorrection()
        fleet.on_forget(state.estimate_correction.forget)
    router_metrics.watch_kv_index(lambda: _kv_indexes(state))
    policy.explaining = state.decisions is not None
    fleet.on_routable(state.admission.engines_available)
    state.tenant_table = tenant_table
    app[STATE] = state
    proxy = Proxy(state)

    # As one of --workers: writes reach every worker, reads see all of them.
    write: Callable[[Handler], Handler] = lambda handler: handler  # noqa: E731
    read_all: Callable[[Handler], Handler] = lambda handler: handler  # noqa: E731
    gather: Callable[[Handler], Handler] = lambda handler: handler  # noqa: E731
    if slot is not None:
        siblings = app[SIBLINGS] = Siblings(slot)
        app[WORKER_SLOT] = slot
        write = functools.partial(replicate_writes, siblings)
        read_all = functools.partial(ask_siblings_on_404, siblings)
        gather = functools.partial(gather_metrics, siblings)
        app.router.add_post(SYNC_PATH, receive_sync)
        app.router.add_get(STATE_PATH, send_state)
        app.router.add_post(BUDGET_PATH, receive_budget)
        app.on_response_prepare.append(name_worker(slot))
    if tenant_table.limits():
        state.budgets = make_budget_gate(settings, tenant_table.limits(), app.get(SIBLINGS))
    app.router.add_get("/health", health.health)
    app.router.add_get("/ready", health.ready)
    app.router.add_get("/metrics", gather(metrics.metrics))
    app.router.add_get("/v1/models", models.list_models)
    deployments.add_routes(app)
    app.router.add_get("/admin/engines", admin.list_engines)
    # Redis is one registry for every worker already; the embedded one is per process
    write_registry = (lambda handler: handler) if settings.redis_url else write
    app.router.add_post("/admin/engines", write_registry(admin.register_engine))
    app.router.add_delete("/admin/engines/{id}", write_registry(admin.delete_engine))
    app.router.add_post("/admin/engines/{id}/drain", write(admin.drain_engine))
    app.router.add_get("/admin/decisions", admin.list_decisions)
    app.router.add_get("/admin/decisions/{request_id}", read_all(admin.get_decision))
    # Exact routes first (cheapest lookup), then every other model-carrying route.
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings"):
        app.router.add_post(path, proxy.handle)
    for path in VLLM_ROUTES:
        app.router.add_post(path, proxy.handle)
    app.router.add_post("/v1/{tail:.+}", proxy.handle)
    # Anything else answers in the OpenAI error shape, not aiohttp's plain text.
    app.router.add_route("*", "/{tail:.*}", _not_found)

    app.cleanup_ctx.append(_services)
    return app


async def _not_found(request: web.Request) -> web.Response:
    path = request.path
    if path.startswith("/v1/") or path in VLLM_ROUTES or path.startswith("/admin/"):
        return error_response(
            405, f"Method {request.method} is not allowed on {path[:200]}.",
            "method_not_allowed",
        )
    return error_response(404, f"No route {path[:200]}.", "not_found")


async def _services(app: web.Application) -> AsyncIterator[None]:
    """Start what serving needs, in order; close it in reverse order (a close that fails
    does not keep the others open)."""
    state = app[STATE]
    settings = state.settings
    services: list[Service] = []
    try:
        clients = EngineClients(settings)
        await clients.start()
        services.append(clients)
        state.upstream, state.session = clients.upstream, clients.session
        sims = await _start_sims(settings, services) if settings.sim_engines else []
        static_urls = [*settings.engine, *sims]
        slot = app.get(WORKER_SLOT)
        state.sources = _registry_sources(state, static_urls, clients.engine_headers,
                                          slot.epoch if slot is not None else None)
        later: list[Service] = [
            LoopLagProbe(settings.loop_lag_interval_s, state.metrics.event_loop_lag.observe),
            *state.sources,
            Scraper(state.fleet, state.client(), settings.scrape_interval_s,
                    settings.scrape_timeout_s, clients.engine_headers),
            HealthChecker(state.fleet, state.client(), settings.health_interval_s,
                          settings.health_timeout_s, clients.engine_headers),
            *_hint_sharing(state),
            *_worker_siblings(app),
            *([state.budgets] if state.budgets is not None else []),
            *_deployment_store(state),
            *_kv_event_feeds(state),
            *_prompt_tokenizers(state, clients.engine_headers),
        ]
        for service in later:
            await service.start()
            services.append(service)
        log.info(
            "router ready: policy %s, %d static engine(s), registry %s",
            settings.policy, len(static_urls), state.sources[-1].name,
        )
        yield
    finally:
        for service in reversed(services):
            with contextlib.suppress(Exception):
                await service.close()
        await asyncio.sleep(0)  # let closed connections release their transports


def _registry_sources(
    state: RouterState, static_urls: list[str], engine_headers: dict[str, str] | None,
    epoch: str | None = None,
) -> list[RegistrySource]:
    """Where engines come from: the static list (--engine, --sim-engines), then the
    writable registry (Redis with --redis-url, else the embedded one). Every change of
    any source re-syncs the fleet from all of them."""
    settings = state.settings
    refusals = RefusalLog(log)
    sources: list[RegistrySource] = []

    def resync() -> None:
        refusals.report(state.fleet.sync((src.name, src.snapshot()) for src in sources))

    if static_urls:
        sources.append(
            StaticRegistry(static_urls, resync, state.client(), headers=engine_headers,
                           epoch=epoch)
        )
    writable: WritableRegistry
    if settings.redis_url:
        from .registry.redis import RedisRegistry  # redis only when asked for

        writable = RedisRegistry(
            settings.redis_url, settings.registry_namespace, resync,
            default_ttl_s=settings.engine_ttl_s,
        )
    else:
        writable = LocalRegistry(resync, settings.engine_ttl_s)
    sources.append(writable)
    state.writable = writable
    resync()
    return sources


def _hint_sharing(state: RouterState) -> list[Service]:
    """Routing hints shared with the other routers through Redis (--share-hints)."""
    settings = state.settings
    if not (settings.redis_url and settings.share_hints):
        return []
    from .hint_sharing import RedisHints

    fleet = state.fleet

    def engine_lookup(engine_id: str) -> tuple[str, int] | None:
        engine = fleet.engines.get(engine_id)
        if engine is None:
            return None
        return engine.record.instance, fleet.kv_capacity_chars(engine)

    return [RedisHints(settings.redis_url, settings.registry_namespace, state.policy,
                       engine_lookup)]


def _worker_siblings(app: web.Application) -> list[Service]:
    """As one of --workers: the clients for the siblings' sockets, and what is sent to
    them (placements, unless Redis shares them already; requests in flight)."""
    siblings = app.get(SIBLINGS)
    if siblings is None:
        return []
    state = app[STATE]
    # with Redis sharing the placements already (with every router), only the counts
    redis_hints = bool(state.settings.redis_url and state.settings.share_hints)
    return [siblings, SiblingSync(siblings, state.fleet, (lambda _limit: [])
                                  if redis_hints else state.policy.export_hints)]


def worker_settings(settings: RouterSettings, slot: WorkerSlot) -> RouterSettings:
    """One worker's share of the router-wide admission limits: the workers' shares add
    up to each limit (a worker admits its share; workers/slot.py split). The per-engine
    limit is not split: each worker checks it against the whole router's requests in
    flight to the engine (its own and what its siblings last told)."""
    return settings.model_copy(update={
        "max_inflight": split(settings.max_inflight, slot.index, slot.count, minimum=1),
        "max_queue": split(settings.max_queue, slot.index, slot.count),
    })


def _kv_indexes(state: RouterState) -> list[tuple[str, str]]:
    """Per engine, the index routing uses for its cache."""
    feeds = state.kv_feeds
    return [(engine_id, "precise" if feeds is not None and feeds.precise(engine_id)
             else "approximate") for engine_id in sorted(state.fleet.engines)]


def _kv_event_feeds(state: RouterState) -> list[Service]:
    """The engines' KV event feeds (--kv-events auto)."""
    if state.settings.kv_events == "off":
        return []
    from .kv_events.feeds import KvEventFeeds

    fleet = state.fleet
    feeds = KvEventFeeds(lambda: [e.record for e in fleet.engines.values()],
                         allow_private=state.settings.allow_private_engine_urls)
    state.kv_feeds = feeds
    return [feeds]


def _prompt_tokenizers(
    state: RouterState, engine_headers: dict[str, str] | None
) -> list[Service]:
    """Tokenizers for the models whose engines publish KV events (--tokenize auto)."""
    feeds = state.kv_feeds
    if feeds is None or state.settings.tokenize == "off":
        return []
    from .prompt_tokens.service import PromptTokenizers

    fleet = state.fleet
    tokenizers = PromptTokenizers(
        lambda: [e.record for e in fleet.engines.values()], feeds.precise, state.client,
        configured=state.settings.tokenizer_dirs(), engine_headers=engine_headers)
    state.tokenizers = tokenizers
    warmer = tokenizers.warmer
    state.metrics.watch_prompt_warmer(
        lambda: {"warmed": warmer.warmed, "dropped": warmer.dropped})
    return [tokenizers]


def _deployment_store(state: RouterState) -> list[Service]:
    """/v1/deployments' store (the shared Redis), with --redis-url only."""
    settings = state.settings
    if not settings.redis_url:
        return []
    from .shared.deployment_store import DeploymentStore
    from .shared.redis_store import connect

    client = connect(settings.redis_url)
    state.deployments = DeploymentStore(client, settings.registry_namespace)
    return [Closing(client.aclose)]


async def _start_sims(settings: RouterSettings, services: list[Service]) -> list[str]:
    """--sim-engines N: simulated engines in this process (closed with the services);
    their URLs."""
    from deepinfer_engine.sim.server import start_sim_server
    from deepinfer_engine.sim.settings import SimSettings

    urls = []
    for i in range(settings.sim_engines):
        sim_settings = SimSettings(
            model=settings.sim_model,
            kv_blocks=settings.sim_kv_blocks,
            speed=settings.sim_speed,
        )
        sim = await start_sim_server(sim_settings, "127.0.0.1", 0)
        services.append(Closing(sim.close))
        urls.append(sim.url)
        log.info("simulated engine %d at %s", i, sim.url)
    return urls
