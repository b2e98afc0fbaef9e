"""Everything a running router holds, hung off the aiohttp application (no globals)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from .admission import Admission
from .decision_log import DecisionLog
from .fairness.tenants import TenantTable
from .fleet import Fleet
from .metrics import RouterMetrics
from .routing.base import RoutingPolicy
from .routing.estimate_correction import EstimateCorrection
from .settings import RouterSettings
from .upstream import UpstreamPool

if TYPE_CHECKING:  # annotations only: the registry sits above this module
    from .budgets.gate import BudgetGate
    from .kv_events.feeds import KvEventFeeds  # zmq only when feeds are followed
    from .prompt_tokens.service import PromptTokenizers  # tokenizers, jinja2 likewise
    from .registry.base import RegistrySource, WritableRegistry
    from .shared.deployment_store import DeploymentStore  # redis only with --redis-url


@dataclass
class RouterState:
    settings: RouterSettings
    fleet: Fleet
    policy: RoutingPolicy
    metrics: RouterMetrics
    admission: Admission
    sources: list[RegistrySource] = field(default_factory=list)
    writable: WritableRegistry | None = None  # where POST /admin/engines writes
    session: aiohttp.ClientSession | None = None  # scrapes, health checks, model lists
    upstream: UpstreamPool | None = None  # proxied requests (the hot path)
    deployments: DeploymentStore | None = None  # with --redis-url: /v1/deployments
    kv_feeds: KvEventFeeds | None = None  # with --kv-events auto
    decisions: DecisionLog | None = None  # with --decision-log-size > 0
    # The approximate estimate's over-estimate per engine, learnt from graded decisions
    # (with decisions and --kv-events auto: it puts both indexes on one scale).
    estimate_correction: EstimateCorrection | None = None
    tokenizers: PromptTokenizers | None = None  # with --kv-events auto --tokenize auto
    shutting_down: bool = False
    tenant_table: TenantTable = field(default_factory=TenantTable)  # keys, names, classes
    budgets: BudgetGate | None = None  # when some tenant has budgets

    def client(self) -> aiohttp.ClientSession:
        assert self.session is not None, "router not started"
        return self.session

    def upstream_pool(self) -> UpstreamPool:
        assert self.upstream is not None, "router not started"
        return self.upstream


STATE: web.AppKey[RouterState] = web.AppKey("deepinfer_state", RouterState)
# Per-request values the access log reads.
REQUEST_ID: web.RequestKey[str] = web.RequestKey("deepinfer_request_id", str)
REQUEST_MODEL: web.RequestKey[str] = web.RequestKey("deepinfer_model", str)
