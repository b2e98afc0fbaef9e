"""One Prometheus exposition from every worker's (pure).

Counters, histograms and summaries add up. Gauges are either a quantity that each worker
holds a part of (requests in flight: summed) or a view of the fleet that every worker
holds whole (engine states, index sizes: the scraped worker's own value). Hand-merged
rather than prometheus-client's multi-process mode: that mode keeps every sample in
mmapped files and cannot express collect-time gauges (engine states, index sizes), which
is most of what the router exports.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector, CollectorRegistry

# Gauges whose workers' values add up to the router's; every other gauge is a view.
SUMMED_GAUGES = frozenset({"deepinfer_engine_inflight_requests"})
WORKERS_GAUGE = "deepinfer_router_workers_reporting"


class _Merged(Collector):
    def __init__(self, families: Sequence[Metric]) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        return self._families


def merge(own: str, others: Sequence[str]) -> bytes:
    """`own` (the scraped worker's exposition) merged with its siblings' `others`."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for position, text in enumerate((own, *others)):
        for family in text_string_to_metric_families(text):
            summed = family.type != "gauge" or family.name in SUMMED_GAUGES
            if family.name not in merged:
                merged[family.name] = Metric(family.name, family.documentation, family.type,
                                             family.unit)
                values[family.name] = {}
            elif not summed:
                continue  # a view: the scraped worker's (position 0) stands
            slot = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if sample.name.endswith("_created"):  # a time: the first worker's
                    slot[key] = min(slot.get(key, sample.value), sample.value)
                elif summed or position == 0:
                    slot[key] = slot.get(key, 0.0) + sample.value
    for name, family in merged.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    reporting = Metric(WORKERS_GAUGE, "Router worker processes whose metrics this scrape "
                       "adds up (the others were restarting).", "gauge")
    reporting.add_sample(WORKERS_GAUGE, {}, float(1 + len(others)))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged([*merged.values(), reporting]))
    return generate_latest(registry)
