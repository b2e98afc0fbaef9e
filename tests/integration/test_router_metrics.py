"""The router's /metrics: the contract's names with the contract's label sets, values that
match a known sequence of requests (each counted once), and a Grafana dashboard whose
queries use only metrics, labels and label values a running router exports."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from deepinfer_router.state import STATE
from tests.support.echo_engine import STATE as ENGINE
from tests.support.router_metrics import metric, samples
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
# ARCHITECTURE.md's metrics and their labels (histograms: their _bucket series add `le`).
CONTRACT: dict[str, set[str]] = {
    "deepinfer_requests_total": {"model", "engine", "route", "status"},
    "deepinfer_request_duration_seconds": {"model"},
    "deepinfer_time_to_first_token_seconds": {"model"},
    "deepinfer_inter_token_latency_seconds": {"model"},
    "deepinfer_engine_inflight_requests": {"engine"},
    "deepinfer_engines": {"state"},
    "deepinfer_upstream_errors_total": {"engine", "kind"},
    "deepinfer_retries_total": {"reason"},
    "deepinfer_rejected_requests_total": {"reason"},
    "deepinfer_routing_decisions_total": {"policy", "reason"},
    "deepinfer_routing_decision_seconds": set(),
    "deepinfer_queue_wait_seconds": set(),
    "deepinfer_registry_up": set(),
    "deepinfer_event_loop_lag_seconds": set(),
    "deepinfer_routing_state_entries": {"table"},
    "deepinfer_cache_prediction_error_tokens": set(),
    "deepinfer_engine_kv_index": {"engine", "index"},
    # deepinfer_misroutes_total{reason} appears with its first misroute:
    # tests/integration/test_decisions_api.py
}
HISTOGRAMS = {name for name in CONTRACT
              if name.endswith("_seconds") or name == "deepinfer_cache_prediction_error_tokens"}
# Counters and histograms whose label sets only appear once something is counted.
ENGINE_STATES = {"healthy", "unhealthy", "ejected", "draining", "pending"}


def label_sets(text: str) -> dict[str, set[frozenset[str]]]:
    """Exported series name (as in PromQL: counters with _total, histogram buckets as
    _bucket) -> the label-name sets its samples carry."""
    out: dict[str, set[frozenset[str]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            out.setdefault(sample.name, set()).add(frozenset(sample.labels))
    return out


@dataclass
class Known:
    m2_requests: int
    m2_failed: int  # first tries that went to b
    ids: tuple[str, str, str]  # engine ids of a, b, c


async def run_known_sequence(echo_engines, router):
    """Engine `a` serves m1; `b` (answers 500) and `c` serve m2, so that m2 requests that
    go to `b` first are retried on `c`."""
    a = await echo_engines("a")
    b = await echo_engines("b", ["m2"])
    c = await echo_engines("c", ["m2"])
    b.app[ENGINE].fail_status = 500
    a.app[ENGINE].token_delay_s = 0.02  # each streamed token its own chunk
    r = await router(engine=[a.url, b.url, c.url], eject_after_failures=100)
    fleet = r.app[STATE].fleet
    await wait_until(lambda: len(fleet.models(time.monotonic())) == 2)
    async with aiohttp.ClientSession() as s:
        m2 = 0
        while not b.app[ENGINE].received and m2 < 30:  # until one went to b first
            async with s.post(r.url + "/v1/completions",
                              json={"model": "m2", "prompt": f"p{m2}"}) as resp:
                assert resp.status == 200
            m2 += 1
        by_url = {e.record.url: e.id for e in fleet.engines.values()}
        known = Known(m2, len(b.app[ENGINE].received),
                      (by_url[a.url], by_url[b.url], by_url[c.url]))
        for body in ({"model": "m1", "prompt": "x", "max_tokens": 2},
                     {"model": "m1", "prompt": "y", "max_tokens": 2},
                     {"model": "m1", "prompt": "z", "max_tokens": 4, "stream": True},
                     {"model": "nope", "prompt": "x"}):
            async with s.post(r.url + "/v1/completions", json=body) as resp:
                await resp.read()
        async with s.post(r.url + "/v1/completions", data=b"{broken") as resp:
            assert resp.status == 400
        async with s.get(r.url + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    return r, text, known


async def test_metrics_names_labels_and_values_after_known_requests(echo_engines, router):
    r, text, known = await run_known_sequence(echo_engines, router)
    assert not any(line.startswith("vllm:") for line in text.splitlines())
    exported = label_sets(text)
    for name, labels in CONTRACT.items():
        series = f"{name}_bucket" if name in HISTOGRAMS else name
        assert series in exported, f"{series} not exported"
        want = labels | {"le"} if name in HISTOGRAMS else labels
        assert exported[series] == {frozenset(want)}, (name, exported[series])

    a_id, b_id, c_id = known.ids
    m2, failed = known.m2_requests, known.m2_failed
    assert failed == 1
    requests = "deepinfer_requests_total"
    assert metric(r, requests) == 5 + m2  # each request once, however many attempts
    assert metric(r, requests, model="m1", engine=a_id, status="200") == 3
    assert metric(r, requests, model="m2", engine=c_id, status="200") == m2
    assert metric(r, requests, engine=b_id) == 0  # a retried attempt is not a request
    assert metric(r, requests, model="", engine="", route="none", status="404") == 1
    assert metric(r, requests, model="", status="400") == 1
    assert metric(r, "deepinfer_request_duration_seconds_count", model="m1") == 3
    assert metric(r, "deepinfer_request_duration_seconds_count", model="m2") == m2
    assert metric(r, "deepinfer_time_to_first_token_seconds_count", model="m1") == 1
    assert metric(r, "deepinfer_inter_token_latency_seconds_count", model="m1") == 3  # 4 tokens
    assert metric(r, "deepinfer_routing_decisions_total", policy="kv-aware") == 3 + m2 + failed
    assert metric(r, "deepinfer_routing_decision_seconds_count") == 3 + m2 + failed
    assert metric(r, "deepinfer_rejected_requests_total", reason="model_not_found") == 1
    assert metric(r, "deepinfer_rejected_requests_total", reason="invalid_json") == 1
    assert metric(r, "deepinfer_rejected_requests_total") == 2
    assert metric(r, "deepinfer_upstream_errors_total", engine=b_id, kind="status_500") == 1
    assert metric(r, "deepinfer_upstream_errors_total") == 1
    assert metric(r, "deepinfer_retries_total", reason="status_500") == 1
    assert metric(r, "deepinfer_retries_total") == 1
    assert metric(r, "deepinfer_queue_wait_seconds_count") == 0
    assert metric(r, "deepinfer_engine_inflight_requests") == 0
    assert metric(r, "deepinfer_engines", state="healthy") == 3
    assert {labels["state"] for labels, _ in samples(r, "deepinfer_engines")} == ENGINE_STATES
    assert metric(r, "deepinfer_registry_up") == 1
    assert metric(r, "deepinfer_routing_state_entries", table="requests") == 0
    assert metric(r, "deepinfer_routing_state_entries", table="prefix_chunks") >= 0


def dashboard_queries() -> list[str]:
    dash = json.loads((ROOT / "configs" / "grafana-dashboard.json").read_text())
    return [t["expr"] for panel in dash["panels"] for t in panel.get("targets", [])]


async def test_dashboard_queries_use_exported_metrics_labels_and_values(echo_engines, router):
    _, text, _ = await run_known_sequence(echo_engines, router)
    exported = label_sets(text)
    known_values = {
        ("deepinfer_engines", "state"): ENGINE_STATES,
    }
    queries = dashboard_queries()
    assert queries
    for expr in queries:
        # Each metric selector: name{label op "value", ...}; Prometheus adds `job`.
        for name, selector in re.findall(r"(deepinfer_[a-z_]+)(?:\{([^}]*)\})?", expr):
            assert name in exported, f"{expr}: unknown metric {name}"
            labels = set().union(*exported[name])
            for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"', selector):
                if label == "job":
                    continue
                assert label in labels, f"{expr}: {name} has no label {label}"
                allowed = known_values.get((name, label))
                if allowed is not None and op == "=":
                    assert value in allowed, f"{expr}: {name}{{{label}}} is never {value!r}"
        # Aggregations: every `by (...)` label exists on the metric aggregated.
        names = re.findall(r"deepinfer_[a-z_]+", expr)
        for by in re.findall(r"by \(([^)]*)\)", expr):
            for label in (x.strip() for x in by.split(",")):
                assert any(label in set().union(*exported[n]) for n in names), (
                    f"{expr}: no metric in it has label {label}")
