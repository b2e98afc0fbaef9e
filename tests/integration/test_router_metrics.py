"""The router's /metrics: contract names, parseable, and the Grafana dashboard's queries
all refer to metrics a running router exports."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from deepinfer_router.state import STATE
from tests.support.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]
CONTRACT = {
    "deepinfer_requests_total", "deepinfer_request_duration_seconds",
    "deepinfer_time_to_first_token_seconds", "deepinfer_inter_token_latency_seconds",
    "deepinfer_engine_inflight_requests", "deepinfer_engines",
    "deepinfer_upstream_errors_total", "deepinfer_retries_total",
    "deepinfer_rejected_requests_total", "deepinfer_routing_decisions_total",
    "deepinfer_routing_decision_seconds", "deepinfer_queue_wait_seconds",
    "deepinfer_registry_up",
}


def exported_names(text: str) -> set[str]:
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            name, kind = line.split()[2:4]
            names.add(name)
            if kind == "counter":
                names.add(name + "_total")
    return names


async def test_metrics_cover_contract_and_dashboard(echo_engines, router):
    a = await echo_engines("a")
    r = await router(engine=[a.url])
    await wait_until(lambda: bool(r.app[STATE].fleet.models(time.monotonic())))
    async with aiohttp.ClientSession() as s:
        async with s.post(r.url + "/v1/completions",
                          json={"model": "m1", "prompt": "x", "stream": True}) as resp:
            await resp.read()
        async with s.get(r.url + "/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
    families = {f.name for f in text_string_to_metric_families(text)}
    assert families  # parses
    assert not any(line.startswith("vllm:") for line in text.splitlines())
    names = exported_names(text)
    missing = CONTRACT - names
    assert not missing, missing

    dash = json.loads((ROOT / "configs" / "grafana-dashboard.json").read_text())
    used = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"deepinfer_[a-z_]+", target["expr"]):
                used.add(re.sub(r"_(bucket|sum|count)$", "", name))
    assert used - names == set(), f"dashboard queries unknown metrics: {used - names}"
