"""Which headers cross the router, each way.

To the engine: the client's headers as they came (a list, so repeated headers stay
repeated) less the hop-by-hop ones (those the client's `Connection` names included) and
those the router sets itself: the engine key (or the client's Authorization, passed as it
came unless the router checks keys or sends its own), X-Request-Id, X-Forwarded-For
(appended to). To the client: the engine's headers less hop-by-hop ones and those the
router sets (x-deepinfer-engine, x-deepinfer-route, X-Request-Id).
"""

from __future__ import annotations

from collections.abc import Iterable

from multidict import CIMultiDictProxy

# Headers that belong to one connection, or that the router sets itself.
_HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection", "Keep-Alive", "Proxy-Authenticate", "Proxy-Authorization", "TE",
        "Trailer", "Transfer-Encoding", "Upgrade", "Host", "Content-Length", "Date", "Server",
    )
)
# The router sets these itself: the engine key (or the client's), the request id, the
# forwarding chain (appended to); `Expect` was answered when the body was read.
_ROUTER_REQUEST_HEADERS = frozenset(("authorization", "x-request-id", "x-forwarded-for", "expect"))
# Response headers the router sets itself (an engine's own x-request-id is replaced).
_NOT_RELAYED = _HOP_BY_HOP | frozenset(("x-deepinfer-engine", "x-deepinfer-route", "x-request-id"))
# One set lookup per header on the hot path instead of two.
_NOT_FORWARDED = _HOP_BY_HOP | _ROUTER_REQUEST_HEADERS


class EngineHeaders:
    """Builds the headers of a request to an engine (settings fixed at construction)."""

    __slots__ = ("_engine_auth", "_not_forwarded")

    def __init__(self, engine_api_key: str | None, client_keys_checked: bool) -> None:
        self._engine_auth = f"Bearer {engine_api_key}" if engine_api_key else None
        strip_client_auth = client_keys_checked or self._engine_auth is not None
        self._not_forwarded = (
            _NOT_FORWARDED if strip_client_auth else _NOT_FORWARDED - {"authorization"}
        )

    def build(
        self, client: CIMultiDictProxy[str], request_id: str, peer: str | None
    ) -> list[tuple[str, str]]:
        drop = self._not_forwarded
        connection = client.get("Connection")
        if connection:
            drop = drop | {token.strip().lower() for token in connection.split(",")}
        headers = [(k, v) for k, v in client.items() if k.lower() not in drop]
        if self._engine_auth is not None:
            headers.append(("Authorization", self._engine_auth))
        headers.append(("X-Request-Id", request_id))
        chain = peer or ""
        if "X-Forwarded-For" in client:
            chain = ", ".join((*client.getall("X-Forwarded-For"), chain))
        headers.append(("X-Forwarded-For", chain))
        return headers


def client_headers(
    engine_headers: Iterable[tuple[str, str]], engine_id: str, route: str, request_id: str,
    extra: Iterable[tuple[str, str]] = (),
) -> list[tuple[str, str]]:
    # A list, not a dict: repeated headers (Set-Cookie, ...) all reach the client.
    headers = [(k, v) for k, v in engine_headers if k.lower() not in _NOT_RELAYED]
    headers += (
        ("x-deepinfer-engine", engine_id),
        ("x-deepinfer-route", route),
        ("X-Request-Id", request_id),
    )
    headers += extra  # the tenant's x-ratelimit-* headers
    return headers
