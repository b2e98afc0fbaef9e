"""The client API key (--api-key): a bearer token compared in constant time."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from ..errors import RouterError


def check_api_key(keys: Sequence[str], authorization: str) -> None:
    """Raises 401 unless `authorization` is `Bearer <one of keys>`; no keys: open."""
    if not keys:
        return
    token = authorization[7:] if authorization[:7].lower() == "bearer " else ""
    # Compare against every key in constant time, so timing tells nothing about a key.
    # (Header bytes that are not UTF-8 arrive as surrogate escapes: encode them back.)
    raw = token.encode("utf-8", "surrogateescape")
    matched = False
    if not raw:  # settings refuse empty keys; an empty token never matches regardless
        raise RouterError(401, "Invalid or missing API key.", "invalid_api_key")
    for key in keys:
        matched |= hmac.compare_digest(raw, key.encode())
    if not matched:
        raise RouterError(401, "Invalid or missing API key.", "invalid_api_key")
