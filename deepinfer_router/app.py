"""Application wiring: build the aiohttp app from settings, start and stop its services."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import aiohttp
from aiohttp import web

from .admission import Admission
from .api import admin, health, metrics, models
from .engine_address import GuardedResolver
from .errors import error_response
from .fleet import Fleet
from .health_checks import HealthChecker
from .loop_lag import LoopLagProbe
from .metrics import RouterMetrics
from .proxy import Proxy, max_body_bytes
from .registry.base import RefusalLog, RegistrySource
from .registry.local import LocalRegistry
from .registry.static import StaticRegistry
from .routing.factory import make_policy
from .scrape import Scraper
from .service import Service
from .settings import RouterSettings
from .state import STATE, RouterState
from .upstream import UpstreamPool

log = logging.getLogger("deepinfer.app")

# JSON routes that carry a `model` and go to an engine serving it, besides /v1/*.
VLLM_ROUTES = ("/tokenize", "/detokenize", "/pooling", "/score", "/rerank", "/classify")


def build_app(settings: RouterSettings) -> web.Application:
    app = web.Application(client_max_size=max_body_bytes(settings.max_body_mb))
    fleet = Fleet(
        chars_per_token=settings.chars_per_token,
        default_kv_tokens=settings.default_engine_kv_tokens,
        stale_after_s=settings.scrape_stale_s,
        eject_after_failures=settings.eject_after_failures,
        eject_cooldown_s=settings.eject_cooldown_s,
        allow_private_urls=settings.allow_private_engine_urls,
        first_byte_timeout_s=settings.first_byte_timeout_s,
    )
    # In a shared fleet, the policy keeps its recent placements for the other routers.
    sharing = bool(settings.redis_url and settings.share_hints)
    policy = make_policy(settings, hint_outbox=4096 if sharing else 0)
    fleet.on_forget(policy.forget_engine)
    router_metrics = RouterMetrics()
    router_metrics.watch_fleet(
        lambda: [(s.id, s.inflight) for s in fleet.engines.values()],
        lambda: fleet.state_counts(time.monotonic()),
    )
    router_metrics.watch_routing(policy.state_sizes)
    state = RouterState(
        settings=settings,
        fleet=fleet,
        policy=policy,
        metrics=router_metrics,
        admission=Admission(settings.max_inflight, settings.max_queue, settings.queue_timeout_s),
    )
    fleet.on_routable(state.admission.engines_available)
    app[STATE] = state
    proxy = Proxy(state)

    app.router.add_get("/health", health.health)
    app.router.add_get("/ready", health.ready)
    app.router.add_get("/metrics", metrics.metrics)
    app.router.add_get("/v1/models", models.list_models)
    app.router.add_get("/admin/engines", admin.list_engines)
    app.router.add_post("/admin/engines", admin.register_engine)
    app.router.add_delete("/admin/engines/{id}", admin.delete_engine)
    app.router.add_post("/admin/engines/{id}/drain", admin.drain_engine)
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


async def _services(app: web.Application) -> Any:
    """Start the client session, registries, sim engines, scraper and health checks;
    stop them in reverse order."""
    state = app[STATE]
    settings = state.settings
    guard = not settings.allow_private_engine_urls
    state.upstream = UpstreamPool(
        connect_timeout_s=settings.connect_timeout_s,
        idle_timeout_s=settings.upstream_keepalive_s,
        guard_addresses=guard,
    )
    resolver = GuardedResolver() if guard else None
    connector = aiohttp.TCPConnector(
        resolver=resolver,
        limit=0,  # admission control bounds concurrency, not the pool
        ttl_dns_cache=60,
        keepalive_timeout=30,
        enable_cleanup_closed=True,
    )
    state.session = aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,  # bodies pass through byte for byte
        timeout=aiohttp.ClientTimeout(
            total=settings.request_timeout_s,
            connect=settings.connect_timeout_s,
            sock_connect=settings.connect_timeout_s,
        ),
        skip_auto_headers=("User-Agent",),
        # A proxy keeps no cookies: an engine's Set-Cookie goes to the client that asked,
        # never onto other clients' requests. The default jar would also filter and
        # update cookies on every request, for nothing.
        cookie_jar=aiohttp.DummyCookieJar(),
    )
    engine_headers = (
        {"Authorization": f"Bearer {settings.engine_api_key}"} if settings.engine_api_key else None
    )
    sims: list[Any] = []
    static_urls = list(settings.engine)
    if settings.sim_engines:
        sims = await _start_sims(settings)
        static_urls += [sim.url for sim in sims]

    refusals = RefusalLog(log)

    def resync() -> None:
        refusals.report(
            state.fleet.sync((src.name, src.snapshot()) for src in state.sources)
        )

    sources: list[RegistrySource] = []
    if static_urls:
        sources.append(
            StaticRegistry(static_urls, resync, state.session, headers=engine_headers)
        )
    if settings.redis_url:
        from .registry.redis import RedisRegistry

        redis_registry = RedisRegistry(
            settings.redis_url,
            settings.registry_namespace,
            resync,
            default_ttl_s=settings.engine_ttl_s,
        )
        sources.append(redis_registry)
        state.writable = redis_registry
    else:
        local = LocalRegistry(resync, settings.engine_ttl_s)
        sources.append(local)
        state.writable = local
    state.sources = sources
    resync()
    scraper = Scraper(
        state.fleet, state.session, settings.scrape_interval_s, settings.scrape_timeout_s,
        engine_headers,
    )
    checker = HealthChecker(
        state.fleet, state.session, settings.health_interval_s, settings.health_timeout_s,
        engine_headers,
    )
    lag_probe = LoopLagProbe(settings.loop_lag_interval_s, state.metrics.event_loop_lag.observe)
    lag_probe.start()
    services: list[Service] = [*sources, scraper, checker]
    if settings.redis_url and settings.share_hints:
        from .registry.redis_hints import RedisHints

        fleet = state.fleet

        def engine_lookup(engine_id: str) -> tuple[str, int] | None:
            engine = fleet.engines.get(engine_id)
            if engine is None:
                return None
            return engine.record.instance, fleet.kv_capacity_chars(engine)

        services.append(
            RedisHints(settings.redis_url, settings.registry_namespace, state.policy,
                       engine_lookup)
        )
    for service in services:
        await service.start()
    log.info(
        "router ready: policy %s, %d static engine(s), registry %s",
        settings.policy, len(static_urls), sources[-1].name if sources else "none",
    )
    yield
    lag_probe.stop()
    for service in reversed(services):
        with contextlib.suppress(Exception):
            await service.close()
    for sim in sims:
        await sim.close()
    await state.session.close()
    if resolver is not None:  # the connector closes only a resolver it made itself
        await resolver.close()
    await state.upstream.close()
    await asyncio.sleep(0)  # let the connector close its transports


async def _start_sims(settings: RouterSettings) -> list[Any]:
    from engines.sim.server import start_sim_server
    from engines.sim.settings import SimSettings

    sims = []
    for i in range(settings.sim_engines):
        sim_settings = SimSettings(
            model=settings.sim_model,
            kv_blocks=settings.sim_kv_blocks,
            speed=settings.sim_speed,
        )
        sims.append(await start_sim_server(sim_settings, "127.0.0.1", 0))
        log.info("simulated engine %d at %s", i, sims[-1].url)
    return sims
