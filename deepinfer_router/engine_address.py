"""Which engine addresses the router may connect to.

An engine URL comes from an operator (`--engine`), the admin API or a shared Redis that
other teams may reach. None of them may point the router at the host's cloud metadata
service or another link-local address: the router would send prompts (and the engine API
key) there, or poll it and report what it answers. The checks run at every source
(`url_problem`, synchronous, on every record) and again at every connection (`resolve_allowed`,
for names, so that a name re-pointed after registration cannot reach such an address).
`--allow-private-engine-urls` turns them off.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud metadata endpoints reachable without being link-local addresses.
METADATA_HOSTS = frozenset(("metadata.google.internal", "metadata", "instance-data"))
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "fd00:ec2::254",  # AWS IMDS over IPv6 (unique-local, not link-local)
        "100.100.100.200",  # Alibaba Cloud metadata
    )
)
# Host names, IPv4 and IPv6 literals (with an IPv6 zone); nothing a resolver could read
# differently from how the checks here read it.
_HOST_CHARS = re.compile(r"[a-z0-9._:%-]+")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_SIIT = ipaddress.ip_network("::ffff:0:0:0/96")  # RFC 2765 IPv4-translated
# Local-use NAT64 (RFC 8215): the IPv4 address may sit at any RFC 6052 position, so the
# whole prefix is refused rather than decoded.
_LOCAL_NAT64 = ipaddress.ip_network("64:ff9b:1::/48")


def embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address carries and reaches: mapped (`::ffff:a.b.c.d`),
    translated (`::ffff:0:a.b.c.d`), IPv4-compatible (`::a.b.c.d`), NAT64
    (`64:ff9b::a.b.c.d`), 6to4 and Teredo. Python's `is_link_local` and friends look
    through none of them."""
    if isinstance(address, ipaddress.IPv4Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    value = int(address)
    if 1 < value < 1 << 32:  # ::a.b.c.d (not :: or ::1)
        return ipaddress.IPv4Address(value)
    if address in _NAT64 or address in _SIIT:
        return ipaddress.IPv4Address(value & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def unmapped(address: IPAddress) -> IPAddress:
    """`::ffff:a.b.c.d` is a.b.c.d (for loopback checks of peers)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _refused(address: IPAddress) -> bool:
    return (
        address.is_link_local
        or address.is_multicast
        or address.is_unspecified
        or address in METADATA_ADDRESSES
    )


def refused_address(address: IPAddress) -> bool:
    """Link-local (cloud metadata lives there), multicast, unspecified or a known
    metadata address, in any IPv6 form that reaches one of those."""
    if isinstance(address, ipaddress.IPv6Address) and address in _LOCAL_NAT64:
        return True
    inner = embedded_ipv4(address)
    return _refused(address) or (inner is not None and _refused(inner))


def _host(url: str) -> tuple[str, str] | None:
    """(scheme, lower-case host) of an http(s)://host[:port] URL, or None. Control
    characters and spaces are refused, not stripped as urlsplit would: the URL ends up
    in request lines and logs."""
    if len(url) > 2048 or not url.isprintable() or " " in url:
        return None
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not _HOST_CHARS.fullmatch(host):
        return None
    if "%" in host and ":" not in host:  # a zone only on an IPv6 literal
        return None
    return parts.scheme, host


class UrlProblem(NamedTuple):
    code: str  # "invalid_engine_url" | "engine_url_refused"
    message: str


def _refused_problem(what: str, kind: str = "link-local/metadata") -> UrlProblem:
    return UrlProblem(
        "engine_url_refused",
        f"Engine URL {what} {kind} and refused (--allow-private-engine-urls to permit).",
    )


def _address_kind(address: IPAddress) -> str:
    inner = embedded_ipv4(address)
    if address.is_unspecified or (inner is not None and inner.is_unspecified):
        return "unspecified (0.0.0.0 or ::, not an engine's address: use 127.0.0.1)"
    return "link-local/metadata"


def ip_literal(host: str) -> IPAddress | None:
    """The address of a host that is an IP literal (an IPv6 one may carry a %zone)."""
    try:
        return ipaddress.ip_address(host.split("%")[0] if ":" in host else host)
    except ValueError:
        return None


def url_problem(url: str, allow_private: bool) -> UrlProblem | None:
    """Why `url` may not be an engine's URL, judged without DNS; None if it may."""
    parsed = _host(url)
    if parsed is None:
        return UrlProblem("invalid_engine_url", "Engine URL must be http(s)://host[:port].")
    if allow_private:
        return None
    host = parsed[1]
    if host.rstrip(".") in METADATA_HOSTS:
        return _refused_problem(f"host {host!r} is a cloud metadata name,")
    address = ip_literal(host)
    if address is None:
        return None  # a name: checked when resolved
    if refused_address(address):
        return _refused_problem(f"address {address} is", _address_kind(address))
    return None


def is_ip_literal(host: str) -> bool:
    return ip_literal(host) is not None


def _address(resolved: str) -> IPAddress:
    """A resolver's answer (an IPv6 one may carry %zone) as an address."""
    return ipaddress.ip_address(resolved.split("%")[0])


class AddressRefusedError(OSError):
    """A name resolved only to refused addresses (an OSError, like any resolver failure,
    so that callers treat it as an unreachable engine)."""


def keep_allowed(host: str, addresses: list[str]) -> list[str]:
    allowed = [a for a in addresses if not refused_address(_address(a))]
    if not allowed:
        raise AddressRefusedError(
            errno.EACCES,
            f"{host} resolves only to link-local/metadata addresses, refused "
            "(--allow-private-engine-urls to permit)",
        )
    return allowed


# loop.getaddrinfo's shape (host, port, type=, proto=) -> [(family, type, proto, name, addr)]
GetAddrInfo = Callable[..., Awaitable[list[tuple[Any, ...]]]]


async def resolve_allowed(
    host: str, port: int, getaddrinfo: GetAddrInfo | None = None
) -> list[str]:
    """The addresses of `host` that the router may connect to, in resolver order; raises
    AddressRefusedError if none (OSError if the name does not resolve). `getaddrinfo`:
    the event loop's (a slow DNS must not stall the router) unless given."""
    if is_ip_literal(host):
        return [host]
    return keep_allowed(host, await _resolve(host, port, getaddrinfo))


async def _resolve(host: str, port: int | None, getaddrinfo: GetAddrInfo | None = None
                   ) -> list[str]:
    """Every address `host` resolves to, in resolver order, without repeats."""
    lookup = getaddrinfo or asyncio.get_running_loop().getaddrinfo
    infos = await lookup(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


async def check_engine_url(url: str, allow_private: bool) -> UrlProblem | None:
    """`url_problem`, then the name's current addresses: every one must be allowed (the
    registration answer tells the operator at once). An unresolvable name passes (routing
    will find it unhealthy, not dangerous)."""
    problem = url_problem(url, allow_private)
    if problem or allow_private:
        return problem
    parsed = _host(url)
    assert parsed is not None
    host = parsed[1]
    if is_ip_literal(host):
        return None
    try:
        resolved = await _resolve(host, None)
    except (OSError, UnicodeError):
        return None
    for answer in resolved:
        address = _address(answer)
        if refused_address(address):
            return _refused_problem(f"host {host!r} resolves to {address},")
    return None


class GuardedResolver(AbstractResolver):
    """aiohttp resolver for the router's engine client (health checks, scrapes, model
    lists): the default resolver's answers without refused addresses. aiohttp connects
    to IP literals without a resolver; those are checked by `url_problem`."""

    def __init__(self, inner: AbstractResolver | None = None) -> None:
        self._inner = inner or DefaultResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed = set(keep_allowed(host, [r["host"] for r in results]))
        return [r for r in results if r["host"] in allowed]

    async def close(self) -> None:
        await self._inner.close()
