"""The router's two HTTP clients to engines, opened and closed together: the hot path's
UpstreamPool (proxied requests) and an aiohttp session (scrapes, health checks, model
lists), both checking engine addresses at connect time unless
--allow-private-engine-urls."""

from __future__ import annotations

import aiohttp

from .engine_address import GuardedResolver
from .settings import RouterSettings
from .upstream import UpstreamPool


class EngineClients:
    def __init__(self, settings: RouterSettings) -> None:
        self._settings = settings
        self.engine_headers = (
            {"Authorization": f"Bearer {settings.engine_api_key}"}
            if settings.engine_api_key else None
        )
        self.upstream: UpstreamPool | None = None
        self.session: aiohttp.ClientSession | None = None
        self._resolver: GuardedResolver | None = None

    async def start(self) -> None:
        settings = self._settings
        guard = not settings.allow_private_engine_urls
        self.upstream = UpstreamPool(
            connect_timeout_s=settings.connect_timeout_s,
            idle_timeout_s=settings.upstream_keepalive_s,
            guard_addresses=guard,
        )
        self._resolver = GuardedResolver() if guard else None
        connector = aiohttp.TCPConnector(
            resolver=self._resolver,
            limit=0,  # admission control bounds concurrency, not the pool
            ttl_dns_cache=60,
            keepalive_timeout=30,
            enable_cleanup_closed=True,
        )
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=False,  # bodies pass through byte for byte
            timeout=aiohttp.ClientTimeout(
                total=settings.request_timeout_s,
                connect=settings.connect_timeout_s,
                sock_connect=settings.connect_timeout_s,
            ),
            skip_auto_headers=("User-Agent",),
            # A proxy keeps no cookies: an engine's Set-Cookie goes to the client that
            # asked, never onto other clients' requests. The default jar would also filter
            # and update cookies on every request, for nothing.
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()
        if self._resolver is not None:  # the connector closes only a resolver it made
            await self._resolver.close()
        if self.upstream is not None:
            await self.upstream.close()
