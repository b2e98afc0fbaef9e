"""vLLM's Prometheus metrics (V1 names, labels and buckets), one registry per engine.

Gauges and counters are read from the engine when scraped (a collector), so the step
loop pays nothing for them; latency histograms are observed as tokens come out.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector

from .model import SimEngine

try:  # the classic text format, which every scraper (and vLLM) speaks
    from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4 as CONTENT_TYPE
except ImportError:  # pragma: no cover - older prometheus_client
    from prometheus_client.exposition import CONTENT_TYPE_LATEST as CONTENT_TYPE

LABELS = ("model_name", "engine")

# vLLM V1's bucket boundaries (vllm/v1/metrics/loggers.py)
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                           40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)

CONTENT_TYPE_HEADER = CONTENT_TYPE


class _EngineCollector(Collector):
    """Gauges and counters straight from the engine's state and cumulative stats."""

    def __init__(self, engine: SimEngine, model_name: str, cache_info: dict[str, str]) -> None:
        self._engine = engine
        self._labels = [model_name, "0"]
        self._cache_info = cache_info

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        e, labels, stats = self._engine, self._labels, self._engine.stats

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=LABELS)
            g.add_metric(labels, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=LABELS)
            c.add_metric(labels, value)
            return c

        yield gauge("vllm:num_requests_running", "Number of requests in model execution "
                    "batches.", e.num_running)
        yield gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                    e.num_waiting)
        usage = e.kv_usage()
        yield gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.",
                    usage)
        # the name vLLM used before 0.10, still read by older dashboards and gateways
        yield gauge("vllm:gpu_cache_usage_perc", "GPU KV-cache usage. 1 means 100 percent "
                    "usage (deprecated name).", usage)
        yield counter("vllm:prefix_cache_queries", "Prefix cache queries, in terms of number "
                      "of queried tokens.", stats.prefix_cache_queries)
        yield counter("vllm:prefix_cache_hits", "Prefix cache hits, in terms of number of "
                      "cached tokens.", stats.prefix_cache_hits)
        yield counter("vllm:num_preemptions", "Cumulative number of preemption from the "
                      "engine.", stats.preemptions)
        yield counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                      stats.prompt_tokens)
        yield counter("vllm:generation_tokens", "Number of generation tokens processed.",
                      stats.generation_tokens)
        success = CounterMetricFamily(
            "vllm:request_success", "Count of successfully processed requests.",
            labels=(*LABELS, "finished_reason"),
        )
        for reason, count in stats.finished.items():
            success.add_metric([*labels, reason], count)
        yield success
        info = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine "
                                 "CacheConfig", labels=(*LABELS, *self._cache_info))
        info.add_metric([*labels, *self._cache_info.values()], 1.0)
        yield info


class SimMetrics:
    """The registry of one simulated engine and the histograms the server observes."""

    def __init__(self, engine: SimEngine, model_name: str, gpu_memory_utilization: float = 0.9
                 ) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        cache_info = {
            "block_size": str(engine.block_size),
            "cache_dtype": "auto",
            "enable_prefix_caching": "True",
            "gpu_memory_utilization": str(gpu_memory_utilization),
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(engine.kv.num_blocks),
            "prefix_caching_hash_algo": "xxhash",
        }
        self.registry.register(_EngineCollector(engine, model_name, cache_info))
        labels = (model_name, "0")

        def hist(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, LABELS, buckets=buckets,
                             registry=self.registry).labels(*labels)

        self.ttft = hist("vllm:time_to_first_token_seconds",
                         "Histogram of time to first token in seconds.", TTFT_BUCKETS)
        self.itl = hist("vllm:inter_token_latency_seconds",
                        "Histogram of inter-token latency in seconds.", ITL_BUCKETS)
        self.e2e = hist("vllm:e2e_request_latency_seconds",
                        "Histogram of e2e request latency in seconds.", REQUEST_LATENCY_BUCKETS)
        self.queue_time = hist("vllm:request_queue_time_seconds",
                               "Histogram of time spent in WAITING phase for request.",
                               REQUEST_LATENCY_BUCKETS)

    def render(self) -> bytes:
        return generate_latest(self.registry)
