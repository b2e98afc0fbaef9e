"""benchmarks/routing.py: pooling repeats (the benchmark itself runs by hand)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.benchmarks import load_benchmark


@pytest.fixture(scope="module")
def rb() -> Any:
    return load_benchmark("routing.py", "routing_bench")


def run(rb: Any, seed: int, ttft: list[float], hits: float, per_engine: list[int]) -> dict:
    return {
        "workload": "3", "level": "high", "policy": "kv-aware", "session_header": True,
        "requests": len(ttft), "offered": len(ttft), "ok": len(ttft), "errors": 0,
        "ttft_ms": rb.percentiles(ttft), "ttft_ms_warm": rb.percentiles(ttft[1:]),
        "output_tokens_per_s": 0.0, "hit_rate": hits / 100,
        "prefix_cache_hits": hits, "prefix_cache_queries": 100.0,
        "imbalance": max(per_engine) / (sum(per_engine) / len(per_engine)),
        "requests_per_engine": per_engine, "busy": [0.5, 0.7], "busy_mean": 0.6,
        "routes": {"new-prefix": len(ttft)}, "cpu": {"router": 0.1, "fleet": 0.2, "loadgen": 0.1},
        "wall_s": 10.0, "preemptions": 0.0, "seed": seed, "_ttft": ttft,
        "_ttft_warm": ttft[1:], "_out_tokens": 100 * len(ttft), "_model_makespan": 25.0,
        "_ttft_1x": [x / 2 for x in ttft], "_ttft_warm_1x": [x / 2 for x in ttft[1:]],
    }


def test_repeats_pool_samples_and_sum_counters(rb: Any) -> None:
    a = run(rb, 1001, [float(x) for x in range(1, 101)], 40.0, [30, 70])
    b = run(rb, 2001, [float(x) for x in range(101, 201)], 60.0, [50, 50])
    merged = rb.merge_repeats([a, b])
    pooled = [float(x) for x in range(1, 201)]
    assert merged["ttft_ms"]["p99"] == rb.pct(pooled, 0.99)
    assert merged["ttft_ms"]["p50"] == rb.pct(pooled, 0.5)
    assert merged["ttft_ms_warm"]["p90"] == rb.pct(pooled[1:100] + pooled[101:], 0.9)
    assert merged["ttft_ms_router_1x"]["p90"] == rb.pct([x / 2 for x in pooled], 0.9)
    assert merged["requests"] == 200 and merged["routes"] == {"new-prefix": 200}
    assert merged["hit_rate"] == 0.5  # (40 + 60) / (100 + 100), not a mean of rates
    assert merged["requests_per_engine"] == [80, 120]
    assert merged["output_tokens_per_s"] == 20_000 / 50.0
    assert merged["seed"] == [1001, 2001]
    assert [r["seed"] for r in merged["repeats"]] == [1001, 2001]
    assert merged["repeats"][0]["p99"] == round(a["ttft_ms"]["p99"], 1)
    assert not any(k.startswith("_") for k in merged)  # raw samples stay out of the JSON


def test_one_run_is_reported_as_is(rb: Any) -> None:
    a = run(rb, 1001, [1.0, 2.0, 3.0], 10.0, [1, 2])
    merged = rb.merge_repeats([a])
    assert merged["ttft_ms"] == a["ttft_ms"] and "repeats" not in merged
    assert not any(k.startswith("_") for k in merged)
