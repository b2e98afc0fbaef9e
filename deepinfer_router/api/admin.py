"""Admin routes: list, register/heartbeat, remove and drain engines.

With `--admin-key` they need `Authorization: Bearer <admin key>`; without it they answer
only clients on loopback."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import orjson
from aiohttp import web
from pydantic import ValidationError

from ..engine_record import EngineRecord
from ..errors import RouterError
from ..registry.redis_store import RegistryUnavailableError
from ..state import STATE, RouterState

# Cloud metadata endpoints reachable without being link-local addresses.
_METADATA_HOSTS = frozenset(("metadata.google.internal", "metadata", "instance-data"))
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "fd00:ec2::254",  # AWS IMDS over IPv6 (unique-local, not link-local)
        "100.100.100.200",  # Alibaba Cloud metadata
    )
)


def _unmapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address
              ) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """`::ffff:a.b.c.d` is a.b.c.d (Python 3.11's checks do not look through it)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def is_loopback_peer(request: web.Request) -> bool:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not peer:
        return False
    try:
        return _unmapped(ipaddress.ip_address(peer[0])).is_loopback
    except ValueError:
        return False


def check_admin(state: RouterState, request: web.Request) -> None:
    key = state.settings.admin_key
    if key:
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode("utf-8", "surrogateescape"), key.encode()):
            raise RouterError(401, "Admin routes need the admin key.", "invalid_admin_key")
    elif not is_loopback_peer(request):
        raise RouterError(
            403, "Admin routes answer loopback clients only when no --admin-key is set.",
            "admin_loopback_only",
        )


async def check_engine_url(url: str, allow_private: bool) -> None:
    """Refuse addresses an attacker could use to reach the host's metadata service."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        host = ""
    if parts.scheme not in ("http", "https") or not host:
        raise RouterError(400, "Engine URL must be http(s)://host[:port].", "invalid_engine_url")
    if allow_private:
        return
    if host in _METADATA_HOSTS or host.rstrip(".") in _METADATA_HOSTS:
        raise RouterError(400, f"Engine URL host {host!r} is refused.", "engine_url_refused")
    try:
        addresses = [ipaddress.ip_address(host)]
    except ValueError:
        try:  # the event loop's resolver: a slow DNS must not stall the router
            infos = await asyncio.get_running_loop().getaddrinfo(
                host, None, proto=socket.IPPROTO_TCP
            )
        except (OSError, UnicodeError):
            return  # unresolvable now: routing will find it unhealthy, not dangerous
        addresses = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
    for address in map(_unmapped, addresses):
        if (address.is_link_local or address.is_multicast or address.is_unspecified
                or address in _METADATA_ADDRESSES):
            raise RouterError(
                400,
                f"Engine URL address {address} is link-local/metadata and refused "
                "(--allow-private-engine-urls to permit).",
                "engine_url_refused",
            )


def _json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


def _admin(handler: Any) -> Any:
    async def wrapped(request: web.Request) -> web.Response:
        state = request.app[STATE]
        try:
            check_admin(state, request)
            return await handler(state, request)  # type: ignore[no-any-return]
        except RouterError as exc:
            return exc.response()

    return wrapped


@_admin
async def list_engines(state: RouterState, request: web.Request) -> web.Response:
    now = time.monotonic()
    engines = []
    for s in sorted(state.fleet.engines.values(), key=lambda s: s.id):
        fresh = s.load.at and now - s.load.at <= state.settings.scrape_stale_s
        engines.append(
            {
                **s.record.model_dump(mode="json"),
                "source": s.source,
                "state": s.state(now),
                "inflight": s.inflight,
                "load": {
                    "waiting": s.load.waiting,
                    "running": s.load.running,
                    "kv_cache_usage": s.load.kv_usage,
                    "num_gpu_blocks": s.load.num_gpu_blocks,
                    "block_size": s.load.block_size,
                    "stale": not fresh,
                },
                "consecutive_failures": s.consecutive_failures,
            }
        )
    return _json({"engines": engines, "registry": [src.status() for src in state.sources]})


@_admin
async def register_engine(state: RouterState, request: web.Request) -> web.Response:
    try:
        payload = orjson.loads(await request.read())
    except orjson.JSONDecodeError as exc:
        raise RouterError(400, f"Malformed JSON body: {exc}", "invalid_json") from None
    if not isinstance(payload, dict):
        raise RouterError(400, "The body must be an engine record object.", "invalid_body")
    ttl = payload.pop("ttl_s", None)
    if ttl is not None and (not isinstance(ttl, int | float) or ttl <= 0 or ttl > 86400):
        raise RouterError(400, "`ttl_s` must be a number of seconds in (0, 86400].", "invalid_ttl")
    try:
        record = EngineRecord.model_validate(payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "record"
        raise RouterError(400, f"Invalid engine record: {field}: {first['msg']}",
                          "invalid_engine_record") from None
    await check_engine_url(record.url, state.settings.allow_private_engine_urls)
    if state.writable is None:
        raise RouterError(503, "No writable registry.", "no_registry")
    try:
        await state.writable.register(record, ttl)
    except RegistryUnavailableError as exc:
        raise RouterError(503, str(exc), "registry_unavailable") from None
    return _json({"id": record.id, "instance": record.instance, "registered": True})


@_admin
async def delete_engine(state: RouterState, request: web.Request) -> web.Response:
    engine_id = request.match_info["id"]
    try:
        removed = state.writable is not None and await state.writable.deregister(engine_id)
    except RegistryUnavailableError as exc:
        raise RouterError(503, str(exc), "registry_unavailable") from None
    if not removed:
        raise RouterError(404, f"No registered engine {engine_id!r}.", "engine_not_found")
    return _json({"id": engine_id, "removed": True})


@_admin
async def drain_engine(state: RouterState, request: web.Request) -> web.Response:
    engine_id = request.match_info["id"]
    undo = request.query.get("undo") in ("1", "true")
    if not state.fleet.set_draining(engine_id, not undo):
        raise RouterError(404, f"No engine {engine_id!r}.", "engine_not_found")
    engine = state.fleet.engines[engine_id]
    return _json({"id": engine_id, "draining": engine.draining, "inflight": engine.inflight})
