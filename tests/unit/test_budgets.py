"""Tenants' budgets (fairness/budgets.py): token buckets per minute for requests and
tokens, corrected by usage; concurrent requests; OpenAI's x-ratelimit-* headers."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepinfer_router.budgets.gate import LocalGate, share
from deepinfer_router.fairness.budgets import (
    Budgets,
    duration,
    ratelimit_headers,
    refusal_message,
)
from deepinfer_router.fairness.tenants import TenantLimits


def test_requests_per_minute_burst_then_refill_at_the_rate():
    b = Budgets({"a": TenantLimits(requests_per_minute=60)})
    for _ in range(60):
        assert b.admit("a", 10, 0.0) is None
        b.finish("a", 10, None, 0.0)
    refusal = b.admit("a", 10, 0.0)
    assert refusal is not None and refusal.limit == "requests_per_minute"
    assert refusal.value == 60 and refusal.retry_after_s == pytest.approx(1.0)
    assert b.admit("a", 10, 0.5) is not None  # half a request refilled
    assert b.admit("a", 10, 1.0) is None  # one a second
    assert b.admit("b", 10, 1.0) is None  # a tenant without budgets


def test_tokens_per_minute_are_corrected_by_usage():
    b = Budgets({"a": TenantLimits(tokens_per_minute=1000)})
    assert b.admit("a", 600, 0.0) is None
    refusal = b.admit("a", 600, 0.0)
    assert refusal is not None and refusal.limit == "tokens_per_minute"
    assert refusal.retry_after_s == pytest.approx(200 * 60 / 1000)
    b.finish("a", 600, 100, 0.0)  # it used far less than estimated: 500 back
    assert b.admit("a", 600, 0.0) is None
    # an underestimate is paid: the bucket goes into debt and the next request waits
    b.finish("a", 600, 1500, 0.0)
    room = b.headroom("a", 0.0)
    assert room.tokens is not None and room.tokens[1] == 0
    refusal = b.admit("a", 10, 0.0)
    assert refusal is not None and refusal.retry_after_s == pytest.approx(610 * 60 / 1000)


def test_a_request_larger_than_the_limit_waits_for_a_full_bucket_not_for_ever():
    b = Budgets({"a": TenantLimits(tokens_per_minute=100)})
    assert b.admit("a", 50, 0.0) is None
    refusal = b.admit("a", 5000, 0.0)
    assert refusal is not None and refusal.retry_after_s == pytest.approx(30.0)
    assert b.admit("a", 5000, 30.0) is None  # full again: let through, into debt
    assert b.admit("a", 1, 31.0) is not None


def test_concurrency_counts_running_requests():
    b = Budgets({"a": TenantLimits(max_concurrency=2)})
    assert b.admit("a", 1, 0.0) is None and b.admit("a", 1, 0.0) is None
    refusal = b.admit("a", 1, 0.0)
    assert refusal is not None and refusal.limit == "max_concurrency"
    b.finish("a", 1, None, 1.0)
    assert b.admit("a", 1, 1.0) is None


def test_a_refusal_takes_nothing():
    b = Budgets({"a": TenantLimits(requests_per_minute=10, tokens_per_minute=100)})
    assert b.admit("a", 1000, 0.0) is None  # a full bucket lets a large one through
    for _ in range(5):
        assert b.admit("a", 10, 0.0) is not None
    room = b.headroom("a", 0.0)
    assert room.requests == (10, 9, pytest.approx(6.0))  # only the admitted one counted


def test_idle_tenants_are_forgotten():
    b = Budgets({"a": TenantLimits(max_concurrency=1, requests_per_minute=60)})
    assert b.admit("a", 1, 0.0) is None
    b.finish("a", 1, None, 0.5)
    assert "a" in b._tenants  # the bucket is not full yet
    assert b.admit("a", 1, 10.0) is None
    b.finish("a", 1, None, 70.0)
    assert "a" not in b._tenants


def test_headers_and_messages_as_openai_writes_them():
    assert duration(0.02) == "20ms" and duration(1.5) == "1.5s" and duration(360) == "6m0s"
    b = Budgets({"a": TenantLimits(requests_per_minute=60, tokens_per_minute=6000)})
    b.admit("a", 600, 0.0)
    headers = ratelimit_headers(b.headroom("a", 0.0))
    assert headers == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s", "x-ratelimit-limit-tokens": "6000",
        "x-ratelimit-remaining-tokens": "5400", "x-ratelimit-reset-tokens": "6s"}
    refusal = Budgets({"a": TenantLimits(max_concurrency=1)})
    refusal.admit("a", 1, 0.0)
    got = refusal.admit("a", 1, 0.0)
    assert got is not None
    assert refusal_message("a", got).startswith(
        "Rate limit reached for tenant a: concurrent requests (limit 1).")


def test_a_shared_limit_splits_without_reaching_zero():
    assert share(TenantLimits(10, 7, None), 4) == TenantLimits(2, 1, None)


def test_the_local_gate_settles_what_it_admitted():
    clock = [0.0]
    gate = LocalGate({"a": TenantLimits(max_concurrency=1, tokens_per_minute=100)},
                     lambda: clock[0])
    first = gate.admit_now("a", 80)
    assert first.refusal is None and first.room.tokens == (100, 20, pytest.approx(48.0))
    assert gate.admit_now("a", 10).refusal is not None  # concurrency
    first.finish(30)  # used 30: 50 back
    second = gate.admit_now("a", 60)
    assert second.refusal is None and second.room.tokens is not None
    assert second.room.tokens[1] == 10


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 5), st.integers(1, 400), st.integers(0, 400)),
                max_size=60))
def test_tokens_admitted_never_exceed_the_limit_plus_refill(events):
    """Whatever the arrivals, what is admitted in [0, T] (charged at usage) stays within
    the bucket: capacity + T x rate (+ one request let into debt)."""
    limit = 1000
    b = Budgets({"a": TenantLimits(tokens_per_minute=limit)})
    now, taken, biggest = 0.0, 0, 0
    for gap, tokens, used in events:
        now += gap
        if b.admit("a", tokens, now) is None:
            b.finish("a", tokens, used, now)
            taken += used
            biggest = max(biggest, used)
    assert taken <= limit + now * limit / 60 + biggest + 1e-6
