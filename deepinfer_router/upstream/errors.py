"""What an upstream request can fail with (timeouts are the caller's own)."""

from __future__ import annotations


class UpstreamError(Exception):
    """Any failure of an upstream request (other than a timeout the caller enforces)."""


class UpstreamConnectError(UpstreamError):
    """The connection could not be made: refused, unreachable, unresolved, TLS failed."""


class UpstreamConnectTimeout(UpstreamError):
    """The connection was not made within the connect timeout."""


class UpstreamDisconnected(UpstreamError):
    """The server closed or reset the connection before its response was complete."""


class UpstreamProtocolError(UpstreamError):
    """The server's answer is not valid HTTP/1.1."""
