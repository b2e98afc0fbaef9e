"""The fair queue (deepinfer_router/fairness/queue.py): class order with aging, weighted
shares across tenants, charges corrected, early leavers, and (hypothesis) every request
served exactly once whatever the arrival sequence."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepinfer_router.fairness.queue import FairQueue


def test_classes_are_served_by_priority():
    q = FairQueue(aging_s=100.0)
    q.push("b", "t", "batch", 1.0, 0.0)
    q.push("s", "t", "standard", 1.0, 0.0)
    q.push("i", "t", "interactive", 1.0, 0.0)
    assert [q.pop(1.0).key for _ in range(3)] == ["i", "s", "b"]  # type: ignore[union-attr]
    assert q.pop(1.0) is None and len(q) == 0


def test_a_waiting_batch_request_ages_past_a_steady_interactive_load():
    """Bound: a batch request's class is served once its oldest has waited (2 - 0) x
    aging_s, however many interactive requests keep arriving (classes that count as
    equal: the one that waited longer goes first)."""
    q = FairQueue(aging_s=1.0)
    q.push("batch", "t", "batch", 1.0, 0.0)
    served_at = None
    for step in range(100):
        now = step * 0.1
        q.push(f"i{step}", "u", "interactive", 1.0, now)
        item = q.pop(now)
        assert item is not None
        if item.key == "batch":
            served_at = now
            break
    assert served_at is not None and 2.0 <= served_at <= 2.15


def test_backlogged_tenants_share_by_weight():
    q = FairQueue(weights={"a": 2.0, "b": 1.0})
    for i in range(600):
        q.push(("a", i), "a", "batch", 100.0, 0.0)
        q.push(("b", i), "b", "batch", 100.0, 0.0)
    served = Counter(q.pop(1.0).tenant for _ in range(300))  # type: ignore[union-attr]
    assert abs(served["a"] - 200) <= 2 and abs(served["b"] - 100) <= 2


def test_cheaper_requests_get_more_through_for_the_same_share():
    """A tenant whose prompts are cached (charged less) gets more requests served."""
    q = FairQueue()
    for i in range(300):
        q.push(("reuse", i), "reuse", "standard", 50.0, 0.0)
        q.push(("cold", i), "cold", "standard", 200.0, 0.0)
    served = Counter(q.pop(1.0).tenant for _ in range(250))  # type: ignore[union-attr]
    assert abs(served["reuse"] - 200) <= 2 and abs(served["cold"] - 50) <= 2


def test_a_charge_corrected_upwards_is_paid_by_that_tenants_next_requests():
    q = FairQueue()
    q.push("a0", "a", "batch", 10.0, 0.0)
    q.push("b0", "b", "batch", 10.0, 0.0)
    q.pop(0.5)
    q.correct("a", "batch", estimated=10.0, actual=510.0)  # a's first cost 50x more
    for i in range(1, 100):  # both stay backlogged: what a is served next pays for it
        q.push(("a", i), "a", "batch", 10.0, 1.0)
        q.push(("b", i), "b", "batch", 10.0, 1.0)
    nxt = Counter(q.pop(2.0).tenant for _ in range(60))  # type: ignore[union-attr]
    assert nxt["b"] >= 50 and nxt["a"] <= 10


def test_a_request_that_leaves_is_never_served_and_not_counted():
    q = FairQueue()
    keep = q.push("keep", "a", "standard", 1.0, 0.0)
    gone = q.push("gone", "a", "standard", 1.0, 0.0)
    q.remove(gone)
    q.remove(gone)  # twice: nothing more
    assert len(q) == 1
    assert q.pop(1.0) is keep
    assert q.pop(1.0) is None and len(q) == 0


def test_requests_that_leave_unserved_cost_their_tenant_nothing():
    q = FairQueue()
    gone = [q.push(("a", i), "a", "standard", 100.0, 0.0) for i in range(100)]
    q.push("b-first", "b", "standard", 100.0, 0.0)
    for item in gone:  # a's burst times out
        q.remove(item)
    for i in range(20):
        q.push(("a", i), "a", "standard", 100.0, 1.0)
        q.push(("b", i), "b", "standard", 100.0, 1.0)
    served = Counter(q.pop(2.0).tenant for _ in range(20))  # type: ignore[union-attr]
    assert abs(served["a"] - served["b"]) <= 2  # a is not locked out


def test_a_request_served_then_removed_is_not_counted_twice():
    """A waiter whose future failed as its slot was handed over: remove() after pop()
    must not count it again (the queue's size would go negative)."""
    q = FairQueue()
    first = q.push("first", "a", "standard", 1.0, 0.0)
    q.push("second", "a", "standard", 1.0, 0.0)
    assert q.pop(1.0) is first
    q.remove(first)
    assert len(q) == 1
    assert q.pop(1.0).key == "second"  # type: ignore[union-attr]
    assert len(q) == 0


def test_a_burst_that_left_is_not_kept():
    q = FairQueue()
    keep = q.push("keep", "x", "standard", 1.0, 0.0)
    for i in range(1000):
        q.remove(q.push(("gone", i), f"t{i}", "standard", 1.0, 0.0))
    c = q._classes["standard"]  # the internals, to check what is held
    assert len(c.fifos) <= 100 and len(c.arrivals) <= 100
    assert q.pop(1.0) is keep
    assert not c.fifos and not c.arrivals and not c.heads and not c.served_finish


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        FairQueue(classes=("a", "a"))
    with pytest.raises(ValueError):
        FairQueue(weights={"t": 0.0})
    with pytest.raises(ValueError):
        FairQueue(aging_s=0.0)


OPS = st.lists(st.tuples(
    st.sampled_from(("push", "push", "push", "pop", "remove")),
    st.sampled_from(("t0", "t1", "t2")),
    st.sampled_from(("interactive", "standard", "batch")),
    st.floats(0.0, 1000.0),
), max_size=300)


@settings(max_examples=200, deadline=None)
@given(OPS)
def test_every_request_is_served_once_or_leaves(ops):
    q = FairQueue(weights={"t0": 3.0, "t1": 1.0}, aging_s=5.0)
    live: list = []
    served: list = []
    removed: list = []
    now = 0.0
    for op, tenant, klass, cost in ops:
        now += 0.5
        if op == "push":
            live.append(q.push(len(live) + len(served) + len(removed), tenant, klass, cost,
                               now))
        elif op == "pop":
            item = q.pop(now)
            assert (item is None) == (not live)
            if item is not None:
                live.remove(item)
                served.append(item)
        elif live:
            item = live.pop(len(live) // 2)
            q.remove(item)
            removed.append(item)
        assert len(q) == len(live)
    while live:
        now += 0.5
        item = q.pop(now)
        assert item is not None
        live.remove(item)
        served.append(item)
    assert q.pop(now) is None
    keys = [i.key for i in served]
    assert len(keys) == len(set(keys))
    assert not {i.key for i in removed} & set(keys)


@pytest.mark.parametrize("order", ["fifo", "round-robin"])
def test_the_orders_it_is_measured_against(order):
    q = FairQueue(weights={"a": 5.0}, order=order)
    for i in range(3):
        q.push(("a", i), "a", "batch", 1000.0, float(i))
    q.push(("b", 0), "b", "batch", 1.0, 3.0)
    q.push(("c", 0), "c", "interactive", 1.0, 4.0)
    got = [q.pop(5.0).key for _ in range(5)]
    if order == "fifo":  # arrival order, class and tenant ignored
        assert got == [("a", 0), ("a", 1), ("a", 2), ("b", 0), ("c", 0)]
    else:  # tenants in turn (cost, weight and class ignored)
        assert got == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("a", 2)]
