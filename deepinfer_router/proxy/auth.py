"""The client API key (--api-key NAME:KEY): a bearer token compared in constant time;
the key names the request's tenant."""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from ..errors import RouterError
from ..fairness.tenants import DEFAULT_TENANT, TenantKey


def check_api_key(keys: Sequence[TenantKey], authorization: str) -> str:
    """The tenant whose key `authorization` (`Bearer <key>`) carries; raises 401 when it
    carries none of `keys`. No keys: open (tenant `default`)."""
    if not keys:
        return DEFAULT_TENANT
    token = authorization[7:] if authorization[:7].lower() == "bearer " else ""
    # Compare against every key in constant time, so timing tells nothing about a key.
    # (Header bytes that are not UTF-8 arrive as surrogate escapes: encode them back.)
    raw = token.encode("utf-8", "surrogateescape")
    if not raw:  # settings refuse empty keys; an empty token never matches regardless
        raise RouterError(401, "Invalid or missing API key.", "invalid_api_key")
    tenant = None
    for key in keys:
        if hmac.compare_digest(raw, key.key.encode()):
            tenant = key.tenant
    if tenant is None:
        raise RouterError(401, "Invalid or missing API key.", "invalid_api_key")
    return tenant
