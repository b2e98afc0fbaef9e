"""What a registry URL names, said once for router and engine manager alike:
`redis://`, `rediss://` (TLS), `unix://` -> a shared Redis; `http(s)://` -> a router's
embedded registry (its admin API). And the URL as logs may show it (no password)."""

from __future__ import annotations

from typing import Literal

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
ROUTER_SCHEMES = ("http://", "https://")

RegistryKind = Literal["redis", "router"]


def registry_kind(url: str) -> RegistryKind:
    """"redis" or "router"; ValueError for any other scheme."""
    if url.startswith(REDIS_SCHEMES):
        return "redis"
    if url.startswith(ROUTER_SCHEMES):
        return "router"
    raise ValueError(
        "a registry URL must be redis://, rediss:// or unix:// (a shared Redis) or "
        f"http(s)://router (a router's embedded registry): {redact(url)!r}"
    )


def check_redis_url(url: str) -> str:
    """`url` when it names a Redis, else ValueError (for settings validators)."""
    if not url.startswith(REDIS_SCHEMES):
        raise ValueError("must start with redis://, rediss:// or unix://")
    return url


def redact(url: str) -> str:
    """The URL without its password (user:password@ or :password@), for logs."""
    if "@" not in url:
        return url
    scheme, _, rest = url.partition("://")
    return f"{scheme}://***@{rest.rsplit('@', 1)[1]}"
