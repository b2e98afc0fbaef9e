"""The pure parts of --workers: how limits split, what a worker's slot says, how the
workers' expositions add up, and the siblings' in-flight view."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from deepinfer_router.app import worker_settings
from deepinfer_router.settings import RouterSettings
from deepinfer_router.workers.metrics_merge import merge
from deepinfer_router.workers.siblings import Siblings
from deepinfer_router.workers.slot import WorkerSlot, split, usable_cores


@given(st.integers(0, 10_000), st.integers(1, 64))
def test_shares_add_up_to_the_limit_and_differ_by_at_most_one(total, count):
    shares = [split(total, i, count) for i in range(count)]
    assert sum(shares) == total
    assert max(shares) - min(shares) <= 1


def test_a_limit_below_the_worker_count_gives_each_at_least_the_minimum():
    assert [split(2, i, 4, minimum=1) for i in range(4)] == [1, 1, 1, 1]


def test_worker_settings_split_the_admission_limits():
    settings = RouterSettings(max_inflight=10, max_inflight_per_engine=5, max_queue=3,
                              workers="2")
    first = worker_settings(settings, WorkerSlot(0, 2, 3, "ep", Path("/tmp/x")))
    second = worker_settings(settings, WorkerSlot(1, 2, 3, "ep", Path("/tmp/x")))
    assert (first.max_inflight, second.max_inflight) == (5, 5)
    # not split: each worker checks the whole router's in flight (siblings' included)
    assert (first.max_inflight_per_engine, second.max_inflight_per_engine) == (5, 5)
    assert (first.max_queue, second.max_queue) == (2, 1)


def test_sim_engines_refuse_several_workers():
    with pytest.raises(ValueError, match="--sim-engines runs in one router process"):
        RouterSettings(sim_engines=2, workers="2")


def test_a_cgroup_quota_below_the_affinity_limits_the_usable_cores(tmp_path):
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("150000 100000\n")  # 1.5 CPUs
    assert usable_cores(cpu_max) == 1
    cpu_max.write_text("max 100000\n")
    assert usable_cores(cpu_max) == len(os.sched_getaffinity(0))
    assert usable_cores(tmp_path / "absent") == len(os.sched_getaffinity(0))


def test_a_slot_travels_through_the_environment():
    slot = WorkerSlot(1, 4, 7, "ep0", Path("/tmp/deepinfer-workers-x"))
    again = WorkerSlot.from_env({"_DEEPINFER_WORKER_SLOT": slot.encode()})
    assert again == slot
    assert again.sibling_sockets == [Path("/tmp/deepinfer-workers-x/worker-0.sock"),
                                     Path("/tmp/deepinfer-workers-x/worker-2.sock"),
                                     Path("/tmp/deepinfer-workers-x/worker-3.sock")]
    assert WorkerSlot.from_env({}) is None


OWN = """\
# HELP deepinfer_requests_total Requests.
# TYPE deepinfer_requests_total counter
deepinfer_requests_total{engine="a",status="200"} 3.0
deepinfer_requests_total{engine="b",status="200"} 1.0
deepinfer_requests_created{engine="a",status="200"} 1700000100.0
# HELP deepinfer_engine_inflight_requests In flight.
# TYPE deepinfer_engine_inflight_requests gauge
deepinfer_engine_inflight_requests{engine="a"} 2.0
# HELP deepinfer_engines Engines by state.
# TYPE deepinfer_engines gauge
deepinfer_engines{state="healthy"} 2.0
# HELP deepinfer_queue_wait_seconds Wait.
# TYPE deepinfer_queue_wait_seconds histogram
deepinfer_queue_wait_seconds_bucket{le="0.1"} 1.0
deepinfer_queue_wait_seconds_bucket{le="+Inf"} 2.0
deepinfer_queue_wait_seconds_count 2.0
deepinfer_queue_wait_seconds_sum 0.5
"""

OTHER = """\
# HELP deepinfer_requests_total Requests.
# TYPE deepinfer_requests_total counter
deepinfer_requests_total{engine="a",status="200"} 4.0
deepinfer_requests_total{engine="c",status="500"} 1.0
deepinfer_requests_created{engine="a",status="200"} 1700000000.0
# HELP deepinfer_engine_inflight_requests In flight.
# TYPE deepinfer_engine_inflight_requests gauge
deepinfer_engine_inflight_requests{engine="a"} 1.0
# HELP deepinfer_engines Engines by state.
# TYPE deepinfer_engines gauge
deepinfer_engines{state="healthy"} 1.0
# HELP deepinfer_queue_wait_seconds Wait.
# TYPE deepinfer_queue_wait_seconds histogram
deepinfer_queue_wait_seconds_bucket{le="0.1"} 0.0
deepinfer_queue_wait_seconds_bucket{le="+Inf"} 1.0
deepinfer_queue_wait_seconds_count 1.0
deepinfer_queue_wait_seconds_sum 2.0
"""


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text.decode()) for s in f.samples}


def test_counters_and_histograms_add_up_in_flight_sums_views_are_the_scraped_workers():
    got = samples(merge(OWN, [OTHER]))
    assert got[("deepinfer_requests_total", (("engine", "a"), ("status", "200")))] == 7.0
    assert got[("deepinfer_requests_total", (("engine", "b"), ("status", "200")))] == 1.0
    assert got[("deepinfer_requests_total", (("engine", "c"), ("status", "500")))] == 1.0
    assert got[("deepinfer_requests_created", (("engine", "a"), ("status", "200")))] == (
        1700000000.0)  # a time: the earliest, not a sum
    assert got[("deepinfer_engine_inflight_requests", (("engine", "a"),))] == 3.0
    assert got[("deepinfer_engines", (("state", "healthy"),))] == 2.0  # a view, not a sum
    assert got[("deepinfer_queue_wait_seconds_bucket", (("le", "+Inf"),))] == 3.0
    assert got[("deepinfer_queue_wait_seconds_sum", ())] == 2.5
    assert got[("deepinfer_router_workers_reporting", ())] == 2.0


def test_a_silent_sibling_counts_no_requests_in_flight():
    siblings = Siblings(WorkerSlot(0, 3, 3, "ep", Path("/tmp/x")))
    siblings.heard(1, {"a": 2, "b": 1}, now=10.0)
    siblings.heard(2, {"a": 3}, now=10.5)
    assert siblings.inflight(now=10.9, max_age_s=1.0) == {"a": 5, "b": 1}
    assert siblings.inflight(now=11.2, max_age_s=1.0) == {"a": 3}  # 1 went silent
    assert siblings.inflight(now=20.0, max_age_s=1.0) == {}
