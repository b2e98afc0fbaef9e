"""Who may use the admin routes.

With `--admin-key`, requests need `Authorization: Bearer <admin key>`. Without it, only
clients on loopback, and only with a loopback `Host` (a page that re-points its own name
at 127.0.0.1, DNS rebinding, sends its own name). In both modes a browser's cross-site
request is refused (`Origin` of another site, `Sec-Fetch-Site: cross-site|same-site`),
and a write with a body must say `Content-Type: application/json`: a web page can send a
"simple" cross-site POST with text/plain without asking first, never with JSON.
"""

from __future__ import annotations

import hmac
import ipaddress
from urllib.parse import urlsplit

from aiohttp import web

from ..engine_address import unmapped
from ..errors import RouterError

_BODYLESS = frozenset(("GET", "HEAD", "OPTIONS"))
# Sec-Fetch-Site values a browser sends for a request the router's own page or the user
# made ("none": typed in the address bar).
_OWN_SITE = frozenset(("same-origin", "none"))
# What a page may send to any address without a CORS preflight.
_FORM_TYPES = frozenset(("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"))


def is_loopback_peer(request: web.Request) -> bool:
    transport = request.transport
    if transport is None:
        return False
    if isinstance(transport.get_extra_info("sockname"), str):
        # a sibling worker over its private Unix socket (--workers): a 0700 directory,
        # so only this user's processes reach it, as local as loopback
        return True
    peer = transport.get_extra_info("peername")
    if not peer:
        return False
    try:
        return unmapped(ipaddress.ip_address(peer[0])).is_loopback
    except ValueError:
        return False


def _host_name(netloc: str) -> str:
    """Host name of a Host header value or URL netloc, without port or brackets."""
    try:
        return (urlsplit(f"//{netloc}").hostname or "").rstrip(".")
    except ValueError:
        return ""


def is_loopback_host(host_header: str) -> bool:
    """`localhost`, `*.localhost` (RFC 6761: never resolved by DNS), a loopback address
    or the unspecified one (`curl http://0.0.0.0:8080`, which a page re-pointing its own
    name cannot send), with or without a port. The host's own name is not: it is what a
    rebinding page's Host looks like too."""
    name = _host_name(host_header)
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        address = unmapped(ipaddress.ip_address(name))
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def _default_port(scheme: str) -> str:
    return "443" if scheme == "https" else "80"


def _same_origin(origin: str, host_header: str, scheme: str) -> bool:
    """`Origin` names this router: same host and port as the request's `Host`."""
    try:
        o = urlsplit(origin)
        o_port = str(o.port or _default_port(o.scheme))
        h = urlsplit(f"//{host_header}")
        h_port = str(h.port or _default_port(scheme))
    except ValueError:
        return False
    return bool(o.hostname) and o.hostname == h.hostname and o_port == h_port


def check_browser_origin(request: web.Request) -> None:
    """Refuse what a browser sends on a web page's behalf to another site."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site.lower() not in _OWN_SITE:
        raise RouterError(
            403, f"Admin routes refuse cross-site requests (Sec-Fetch-Site: {site[:40]}).",
            "cross_site_request",
        )
    origin = request.headers.get("Origin")
    if origin is not None and not _same_origin(
        origin, request.headers.get("Host", ""), request.scheme
    ):
        raise RouterError(
            403, f"Admin routes refuse cross-site requests (Origin: {origin[:200]}).",
            "cross_site_request",
        )


def check_json_body(request: web.Request) -> None:
    """A write with a body is JSON. One without may say any Content-Type but those a web
    page can send cross-site without asking first (CORS-safelisted: an empty HTML form
    POST says form-urlencoded); curl -X POST says none, aiohttp octet-stream."""
    if request.method in _BODYLESS:
        return
    content_type = request.content_type
    if request.body_exists:
        if content_type == "application/json":
            return
    elif "Content-Type" not in request.headers or content_type not in _FORM_TYPES:
        return
    raise RouterError(
        415, "Admin requests with a body must be Content-Type: application/json.",
        "unsupported_media_type",
    )


def check_admin(admin_key: str | None, request: web.Request) -> None:
    if admin_key:
        auth = request.headers.get("Authorization", "")
        token = auth[7:] if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode("utf-8", "surrogateescape"), admin_key.encode()):
            raise RouterError(401, "Admin routes need the admin key.", "invalid_admin_key")
    else:
        if not is_loopback_peer(request):
            raise RouterError(
                403, "Admin routes answer loopback clients only when no --admin-key is set.",
                "admin_loopback_only",
            )
        host = request.headers.get("Host")
        if host is not None and not is_loopback_host(host):
            raise RouterError(
                403, f"Admin routes without --admin-key need a loopback Host, not {host[:200]!r}.",
                "admin_loopback_only",
            )
    check_browser_origin(request)
    check_json_body(request)
