"""One client request as it moves through the proxy: what parsing found, and what the
current attempt has done so far."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from ..budgets.gate import Finish
from ..decision_log import DecisionRecord
from ..routing.base import RequestFeatures
from .usage import Usage


@dataclass(slots=True)
class Call:
    request: web.Request
    rid: str
    model: str
    body: bytes
    stream: bool
    features: RequestFeatures
    started: float
    parsed: dict[str, Any] | None  # the JSON body, until the features are taken from it
    route: str = "none"
    engine: str = ""
    status: int = 499  # until known: the client went away
    answered: bool = False  # the engine's response head arrived (this attempt)
    sent: bool = False  # some attempt sent it to an engine (never reset)
    stream_usage: bool = False  # a stream whose client asked for usage (stream_options)
    decision: DecisionRecord | None = None  # this attempt's, while decisions are logged
    cached_tokens: int | None = None  # what this attempt's engine reported cached
    tokenized: bool = False  # the prompt ids are the router's own tokenization
    tenant: str = "default"  # whose request (fairness/tenants.py)
    klass: str = "standard"  # its class (the tenant's, lowered by X-Priority)
    tenant_label: str = "default"  # the tenant as metrics name it (bounded)
    priority: int | None = None  # its class's rank, for engines that take vLLM's priority
    output_tokens: int = 0  # expected: max_tokens, or --expected-output-tokens
    queue_charge: float | None = None  # what the fair queue charged it (if it waited)
    budget_finish: Finish | None = None  # its tenant's budgets were charged: settle them
    extra_headers: list[tuple[str, str]] | None = None  # x-ratelimit-* for the client
    add_usage: bool = False  # a stream whose usage the router asks for (and strips)
    usage: Usage | None = None  # the answer's, when wanted and reported
