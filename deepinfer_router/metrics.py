"""Router metrics (prefix `deepinfer_`, base units), on a per-application registry.

Gauges that mirror fleet state (in-flight per engine, engines by state) are computed at
scrape time from the fleet itself, so they can never drift from the truth or leak.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Generic, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
    40.0, 80.0, 160.0, 640.0,
)
TOKEN_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 2.5, 5.0,
)
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DECISION_BUCKETS = (
    0.00001, 0.000025, 0.00005, 0.0001, 0.00015, 0.00025, 0.0005, 0.001, 0.0025, 0.01,
)

# Predicted - actual cached tokens: symmetric, a block (16) to a long prompt either way.
PREDICTION_ERROR_BUCKETS = (
    -16384.0, -4096.0, -1024.0, -256.0, -64.0, -16.0, -1.0, 0.0, 16.0, 64.0, 256.0, 1024.0,
    4096.0, 16384.0,
)


M = TypeVar("M", Counter, Histogram)


class LabelCache(Generic[M]):
    """`metric.labels(*values)`, memoised.

    prometheus_client's `labels()` validates the values and takes the metric's lock on
    every call (about 2 us); the proxy asks for the same few children on every request,
    several times. The children live as long as the metric anyway (nothing here removes
    label sets), so holding them in a dict changes nothing but the cost.
    """

    __slots__ = ("_children", "_metric")

    def __init__(self, metric: M) -> None:
        self._metric: M = metric
        self._children: dict[tuple[str, ...], Any] = {}

    def __call__(self, *values: str) -> M:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._metric.labels(*values)
        return child  # type: ignore[no-any-return]


class LoopHistogram(Collector):
    """A histogram without labels, observed from the event loop's thread only: a bisect
    and two additions per observation. prometheus_client's Histogram takes a lock and
    walks its buckets (about 1.5 us); this one is for observations made on every request
    that would otherwise cost more than the rest of their bookkeeping. A scrape from
    another thread reads a copy of the counts (its sum may miss one observation)."""

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self.name = name
        self._doc = documentation
        self._bounds = list(buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last: over every bound
        self._sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def collect(self) -> Iterable[Metric]:
        counts = list(self._counts)
        buckets: list[tuple[str, float]] = []
        total = 0
        for bound, n in zip(self._bounds, counts, strict=False):
            total += n
            buckets.append((floatToGoString(bound), total))
        buckets.append(("+Inf", total + counts[-1]))
        family = HistogramMetricFamily(self.name, self._doc, buckets=buckets,
                                       sum_value=self._sum)
        if not any(s.name.endswith("_count") for s in family.samples):
            # With negative buckets the family leaves out _count and _sum (an OpenMetrics
            # rule); prometheus_client's own Histogram writes them, and so does this.
            family.add_sample(self.name + "_count", {}, total + counts[-1])
            family.add_sample(self.name + "_sum", {}, self._sum)
        yield family


class _KvIndexCollector(Collector):
    def __init__(self, indexes: Callable[[], Iterable[tuple[str, str]]]) -> None:
        self._indexes = indexes

    def collect(self) -> Iterable[Metric]:
        g = GaugeMetricFamily(
            "deepinfer_engine_kv_index",
            "1 for the index routing uses for each engine's cache: precise (the engine's "
            "KV events) or approximate (estimated from what this router sent it).",
            labels=["engine", "index"],
        )
        for engine, index in self._indexes():
            g.add_metric([engine, index], 1)
        yield g


class _PromptWarmerCollector(Collector):
    def __init__(self, counts: Callable[[], dict[str, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterable[Metric]:
        c = CounterMetricFamily(
            "deepinfer_prompts_encoded_ahead",
            "Prompts whose head alone was tokenized before routing (no engine held it) and "
            "whose rest was then encoded beside the request, for when the prompt returns: "
            "warmed, or dropped (the queue was full; its next request encodes it).",
            labels=["result"],
        )
        for result, n in self._counts().items():
            c.add_metric([result], n)
        yield c


class _FleetCollector(Collector):
    def __init__(
        self,
        inflight: Callable[[], Iterable[tuple[str, int]]],
        states: Callable[[], dict[str, int]],
    ) -> None:
        self._inflight = inflight
        self._states = states

    def collect(self) -> Iterable[Metric]:
        g = GaugeMetricFamily(
            "deepinfer_engine_inflight_requests",
            "Requests this router has in flight to each engine.",
            labels=["engine"],
        )
        for engine, n in self._inflight():
            g.add_metric([engine], n)
        yield g
        s = GaugeMetricFamily(
            "deepinfer_engines", "Engines known to this router, by state.", labels=["state"]
        )
        for state, n in self._states().items():
            s.add_metric([state], n)
        yield s


class _RoutingStateCollector(Collector):
    def __init__(self, sizes: Callable[[], dict[str, int]]) -> None:
        self._sizes = sizes

    def collect(self) -> Iterable[Metric]:
        g = GaugeMetricFamily(
            "deepinfer_routing_state_entries",
            "Entries in each bounded table of the routing policy (sessions: bindings, at "
            "most --max-sessions; prefix_chunks: distinct prompt chunks estimated cached; "
            "requests: routed and not complete; hint_outbox: placements not yet shared).",
            labels=["table"],
        )
        for table, n in self._sizes().items():
            g.add_metric([table], n)
        yield g


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "deepinfer_requests_total",
            "Requests answered, by model, engine, routing reason and HTTP status.",
            ["model", "engine", "route", "status"],
            registry=r,
        )
        self.request_duration = Histogram(
            "deepinfer_request_duration_seconds",
            "Time from request arrival to the end of the response.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.ttft = Histogram(
            "deepinfer_time_to_first_token_seconds",
            "Streaming requests: time from arrival to the first content chunk.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "deepinfer_inter_token_latency_seconds",
            "Streaming requests: time between successive chunks.",
            ["model"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.upstream_errors = Counter(
            "deepinfer_upstream_errors_total",
            "Failures talking to engines, by kind (connect, reset, timeout, status_5xx, ...).",
            ["engine", "kind"],
            registry=r,
        )
        self.retries = Counter(
            "deepinfer_retries_total", "Requests retried on another engine, by reason.",
            ["reason"], registry=r,
        )
        self.rejected = Counter(
            "deepinfer_rejected_requests_total",
            "Requests refused by the router itself, by reason.",
            ["reason"],
            registry=r,
        )
        self.routing_decisions = Counter(
            "deepinfer_routing_decisions_total",
            "Routing decisions, by policy and reason.",
            ["policy", "reason"],
            registry=r,
        )
        self.routing_decision_seconds = Histogram(
            "deepinfer_routing_decision_seconds",
            "Time the routing policy takes to choose an engine (its select: prefix lookup, "
            "scoring, the guard); prompt extraction and hashing happen earlier, while the "
            "body is parsed, and are not included.",
            buckets=DECISION_BUCKETS,
            registry=r,
        )
        self.queue_wait = Histogram(
            "deepinfer_queue_wait_seconds",
            "Time requests waited for admission.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tenant_queue_wait = Histogram(
            "deepinfer_tenant_queue_wait_seconds",
            "Time requests that waited for a router slot waited, by tenant (configured "
            "names; others `other`) and class.",
            ["tenant", "class"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.registry_up = Gauge(
            "deepinfer_registry_up", "1 when the engine registry backend is reachable.",
            registry=r,
        )
        self.registry_up.set(1)
        self.event_loop_lag = Histogram(
            "deepinfer_event_loop_lag_seconds",
            "How late the router's periodic event-loop probe fired (--loop-lag-interval-s): "
            "time during which no request could make progress.",
            buckets=LOOP_LAG_BUCKETS,
            registry=r,
        )
        self.cache_prediction_error = LoopHistogram(
            "deepinfer_cache_prediction_error_tokens",
            "Predicted minus actual cached prompt tokens on the chosen engine, for answers "
            "that report usage.prompt_tokens_details.cached_tokens (vLLM with "
            "--enable-prompt-tokens-details; streams only when the client asked for usage).",
            PREDICTION_ERROR_BUCKETS,
        )
        r.register(self.cache_prediction_error)
        self.misroutes = Counter(
            "deepinfer_misroutes_total",
            "Requests whose engine turned out to hold fewer cached prompt tokens than another "
            "candidate was known to hold, by more than one block; by routing reason.",
            ["reason"],
            registry=r,
        )
        self.tenant_requests = Counter(
            "deepinfer_tenant_requests_total",
            "Requests answered, by tenant (configured names; others `other`), class and "
            "HTTP status.",
            ["tenant", "class", "status"],
            registry=r,
        )
        self.tenant_tokens = Counter(
            "deepinfer_tenant_tokens_total",
            "Tokens of answered requests by tenant (configured names; others `other`) and "
            "kind: prompt, cached (of the prompt, where the engine reports it) and "
            "completion, from the usage in each answer (JSON answers; streams whose client "
            "asked for usage, or whose tenant has a token budget).",
            ["tenant", "kind"],
            registry=r,
        )
        self.budget_refusals = Counter(
            "deepinfer_tenant_budget_rejected_total",
            "Requests refused with 429 because their tenant was over a budget, by tenant and "
            "limit (max_concurrency, requests_per_minute, tokens_per_minute).",
            ["tenant", "limit"],
            registry=r,
        )
        # Memoised children of the metrics the proxy touches on every request.
        self.requests_by = LabelCache(self.requests)
        self.tenant_requests_by = LabelCache(self.tenant_requests)
        self.request_duration_by = LabelCache(self.request_duration)
        self.ttft_by = LabelCache(self.ttft)
        self.itl_by = LabelCache(self.itl)
        self.routing_decisions_by = LabelCache(self.routing_decisions)
        self.misroutes_by = LabelCache(self.misroutes)
        self.budget_refusals_by = LabelCache(self.budget_refusals)
        self.tenant_tokens_by = LabelCache(self.tenant_tokens)

    def watch_fleet(
        self,
        inflight: Callable[[], Iterable[tuple[str, int]]],
        states: Callable[[], dict[str, int]],
    ) -> None:
        self.registry.register(_FleetCollector(inflight, states))

    def watch_routing(self, sizes: Callable[[], dict[str, int]]) -> None:
        self.registry.register(_RoutingStateCollector(sizes))

    def watch_prompt_warmer(self, counts: Callable[[], dict[str, int]]) -> None:
        """deepinfer_prompts_encoded_ahead_total{result}: warmed or dropped."""
        self.registry.register(_PromptWarmerCollector(counts))

    def watch_kv_index(self, indexes: Callable[[], Iterable[tuple[str, str]]]) -> None:
        """deepinfer_engine_kv_index{engine,index}: 1 for the index routing uses for each
        engine (precise: its KV event feed is live; approximate: the router's estimate)."""
        self.registry.register(_KvIndexCollector(indexes))
