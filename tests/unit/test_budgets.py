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

_ids = iter(range(10**9))


def rid() -> str:
    return f"r{next(_ids)}"


def test_requests_per_minute_burst_then_refill_at_the_rate():
    b = Budgets({"a": TenantLimits(requests_per_minute=60)})
    for _ in range(60):
        assert b.admit("a", 10, 0.0, "x") is None
        assert b.finish("a", "x", 10, None, 0.0)
    refusal = b.admit("a", 10, 0.0, rid())
    assert refusal is not None and refusal.limit == "requests_per_minute"
    assert refusal.value == 60 and refusal.retry_after_s == pytest.approx(1.0)
    assert b.admit("a", 10, 0.5, rid()) is not None  # half a request refilled
    assert b.admit("a", 10, 1.0, rid()) is None  # one a second
    assert b.admit("b", 10, 1.0, rid()) is None  # a tenant without budgets


def test_tokens_per_minute_are_corrected_by_usage():
    b = Budgets({"a": TenantLimits(tokens_per_minute=1000)})
    assert b.admit("a", 600, 0.0, "one") is None
    refusal = b.admit("a", 600, 0.0, rid())
    assert refusal is not None and refusal.limit == "tokens_per_minute"
    assert refusal.retry_after_s == pytest.approx(200 * 60 / 1000)
    assert b.finish("a", "one", 600, 100, 0.0)  # it used far less than estimated: 500 back
    assert not b.finish("a", "one", 600, 100, 0.0)  # said twice: counted once
    assert b.admit("a", 600, 0.0, "two") is None
    # an underestimate is paid: the bucket goes into debt and the next request waits
    b.finish("a", "two", 600, 1500, 0.0)
    room = b.headroom("a", 0.0)
    assert room.tokens is not None and room.tokens[1] == 0
    refusal = b.admit("a", 10, 0.0, rid())
    assert refusal is not None and refusal.retry_after_s == pytest.approx(610 * 60 / 1000)


def test_a_request_larger_than_the_limit_waits_for_a_full_bucket_not_for_ever():
    b = Budgets({"a": TenantLimits(tokens_per_minute=100)})
    assert b.admit("a", 50, 0.0, rid()) is None
    refusal = b.admit("a", 5000, 0.0, rid())
    assert refusal is not None and refusal.retry_after_s == pytest.approx(30.0)
    assert b.admit("a", 5000, 30.0, rid()) is None  # full again: let through, into debt
    assert b.admit("a", 1, 31.0, rid()) is not None


def test_concurrency_counts_running_requests():
    b = Budgets({"a": TenantLimits(max_concurrency=2)})
    assert b.admit("a", 1, 0.0, "one", 100.0) is None and b.admit("a", 1, 0.0, "two") is None
    refusal = b.admit("a", 1, 0.0, rid())
    assert refusal is not None and refusal.limit == "max_concurrency"
    assert not b.finish("a", "never-admitted", 1, None, 1.0)  # frees nothing
    assert b.admit("a", 1, 1.0, rid()) is not None
    b.finish("a", "two", 1, None, 1.0)
    assert b.admit("a", 1, 1.0, "three") is None
    # a place whose end is never told is freed at its expiry
    assert b.admit("a", 1, 99.0, rid()) is not None
    assert b.admit("a", 1, 100.0, rid()) is None


def test_a_refusal_takes_nothing():
    b = Budgets({"a": TenantLimits(requests_per_minute=10, tokens_per_minute=100)})
    assert b.admit("a", 1000, 0.0, rid()) is None  # a full bucket lets a large one through
    for _ in range(5):
        assert b.admit("a", 10, 0.0, rid()) is not None
    room = b.headroom("a", 0.0)
    assert room.requests == (10, 9, pytest.approx(6.0))  # only the admitted one counted


def test_idle_tenants_are_forgotten():
    b = Budgets({"a": TenantLimits(max_concurrency=1, requests_per_minute=60)})
    assert b.admit("a", 1, 0.0, "one") is None
    b.finish("a", "one", 1, None, 0.5)
    assert "a" in b._tenants  # the bucket is not full yet
    assert b.admit("a", 1, 10.0, "two") is None
    b.finish("a", "two", 1, None, 70.0)
    assert "a" not in b._tenants


def test_headers_and_messages_as_openai_writes_them():
    assert duration(0.02) == "20ms" and duration(1.5) == "1.5s" and duration(360) == "6m0s"
    b = Budgets({"a": TenantLimits(requests_per_minute=60, tokens_per_minute=6000)})
    b.admit("a", 600, 0.0, rid())
    headers = ratelimit_headers(b.headroom("a", 0.0))
    assert headers == {
        "x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s", "x-ratelimit-limit-tokens": "6000",
        "x-ratelimit-remaining-tokens": "5400", "x-ratelimit-reset-tokens": "6s"}
    refusal = Budgets({"a": TenantLimits(max_concurrency=1)})
    refusal.admit("a", 1, 0.0, rid())
    got = refusal.admit("a", 1, 0.0, rid())
    assert got is not None
    assert refusal_message("a", got).startswith(
        "Rate limit reached for tenant a: concurrent requests (limit 1).")


def test_a_shared_limit_splits_without_reaching_zero():
    assert share(TenantLimits(10, 7, None), 4) == TenantLimits(2, 1, None)


def test_the_local_gate_settles_what_it_admitted():
    clock = [0.0]
    gate = LocalGate({"a": TenantLimits(max_concurrency=1, tokens_per_minute=100)},
                     clock=lambda: clock[0])
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
        if b.admit("a", tokens, now, "x") is None:
            b.finish("a", "x", tokens, used, now)
            taken += used
            biggest = max(biggest, used)
    assert taken <= limit + now * limit / 60 + biggest + 1e-6


def test_the_usage_the_router_asked_for_is_taken_out_of_the_stream():
    from deepinfer_router.proxy.usage import UsageStripper, usage_in

    usage = (b'data: {"id":"x","object":"chat.completion.chunk","choices":[],'
             b'"usage":{"prompt_tokens":7,"completion_tokens":3,"total_tokens":10}}\n\n')
    tokens = b'data: {"id":"x","choices":[{"index":0,"delta":{"content":"a"}}]}\n\n'
    done = b"data: [DONE]\n\n"
    stream = tokens * 3 + usage + done
    for cut in range(1, len(stream), 7):  # every way a read can cut it
        s = UsageStripper()
        out = s.feed(stream[:cut]) + s.feed(stream[cut:]) + s.flush()
        assert out == tokens * 3 + done
    s = UsageStripper()
    assert s.feed(tokens) == tokens  # whole events go straight through
    assert usage_in(usage) == (7, 3, None)
    # a usage cut by a read is found with the end of the chunk before it
    cut = usage.index(b"\"completion_tokens") + 4
    assert usage_in(usage[cut:]) is None and usage_in(usage[:cut][-512:] + usage[cut:]) == (
        7, 3, None)


def test_members_are_spliced_into_the_body():
    import json

    from deepinfer_router.proxy.body_members import ASK_USAGE, priority_member, with_members

    members = priority_member(2) + b"," + ASK_USAGE
    for body in (b"{}", b' {"a": 1, "priority": -5}\n', b'{"s": "}"}'):
        out = json.loads(with_members(body, members))
        assert out["priority"] == 2 and out["stream_options"] == {"include_usage": True}
    assert with_members(b"[1]", members) == b"[1]"


async def test_an_end_is_told_again_until_heard(monkeypatch):
    import asyncio

    from deepinfer_router.budgets import ends as ends_module

    monkeypatch.setattr(ends_module, "RETRY_DELAYS_S", (0.0, 0.01, 0.01, 0.01))
    monkeypatch.setattr(ends_module, "UNDO_AGAIN_S", (0.02, 0.04))
    told: list[tuple[str, int | None]] = []
    answers = iter([False, False, True])

    async def tell(tenant: str, rid: str, tokens: int, used: int | None) -> bool:
        told.append((rid, used))
        return next(answers, True)

    e = ends_module.Ends(tell)
    e.finish("a", "r1", 10, 5, ends_module.RETRY_DELAYS_S)
    await asyncio.sleep(0.1)
    assert told == [("r1", 5)] * 3  # heard at the third try, then no more
    told.clear()
    e.undo("a", "r2", 10)  # at once, and again later (idempotent where it lands)
    await asyncio.sleep(0.1)
    assert told == [("r2", 0)] * 3
    await e.close()


def test_a_stream_framed_otherwise_is_passed_through():
    from deepinfer_router.proxy.usage import UsageStripper

    s = UsageStripper()
    crlf = b'data: {"choices":[],"usage":{"prompt_tokens":1}}\r\n\r\n' * 2000
    out = s.feed(crlf[:40000]) + s.feed(crlf[40000:]) + s.flush()
    assert out == crlf  # nothing held back for ever, nothing lost
