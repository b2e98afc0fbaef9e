"""How one attempt on an engine can fail, and which failures another engine may retry.

An `EngineFailure` before any byte reached the client is either `Retryable` (the
dispatcher tries another engine) or an `EngineTimeout` (not retried: the engine may still
be working on it). Both are counted by the attempt's accounting; the dispatcher turns the
last one into an `UpstreamFailure`, the error the client gets. The two are siblings, so
neither is caught as the other whatever the order of `except` clauses.
"""

from __future__ import annotations

import time

from ..errors import RouterError

TIMEOUT_MESSAGES = {
    "first_byte_timeout": "The engine did not start answering within --first-byte-timeout-s.",
    "idle_timeout": "The engine sent nothing for --stream-idle-timeout-s.",
    "total_timeout": "The request took longer than --request-timeout-s.",
}


class EngineFailure(Exception):
    """An engine failed before any byte reached the client. `kind` labels
    deepinfer_upstream_errors_total; `status` and `message` are the client's if it is the
    last."""

    def __init__(self, kind: str, status: int, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.status = status
        self.message = message


class Retryable(EngineFailure):
    """Another engine may take the request (connect failure, reset, 5xx but 501)."""


class EngineTimeout(EngineFailure):
    """No byte from the engine in time. Not retried: the engine may still be working."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind, 504, TIMEOUT_MESSAGES[kind])


class UpstreamFailure(RouterError):
    """The engine failed (after retries): counted in deepinfer_upstream_errors_total, not
    as a rejection by the router."""


class ClientGone(Exception):
    """The client stopped reading for longer than the idle timeout; its connection was
    closed."""


def timeout_kind(deadline: float, kind: str) -> str:
    """`kind`, or `total_timeout` when the request's overall deadline is what ran out."""
    return "total_timeout" if time.monotonic() >= deadline - 0.001 else kind
