"""The admission queue's engine-slot wait: arrival order kept across wake-ups, one waiter
woken per finished request, every waiter woken when an engine becomes available."""

from __future__ import annotations

import asyncio

import pytest

from deepinfer_router.admission import Admission, AdmissionRejected
from tests.support.waiting import wait_until


async def _waiter(adm: Admission, order: list[str], name: str, ticket: int,
                  rooms: list[bool]) -> None:
    """Wait like the proxy does: woken, take the room if there is one, else requeue."""
    requeue = False
    while True:
        await adm.wait_engine_slot("m", 5.0, ticket, requeue)
        requeue = True
        if rooms and rooms[0]:
            rooms.pop(0)
            order.append(name)
            return


async def _spin(turns: int = 5) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


async def test_freed_slots_go_in_arrival_order_even_after_failed_wakeups() -> None:
    adm = Admission(max_inflight=100, max_queue=10, queue_timeout_s=5.0)
    order: list[str] = []
    rooms: list[bool] = []
    tasks = []
    for n, name in enumerate("abcd", 1):
        tasks.append(asyncio.create_task(_waiter(adm, order, name, adm.engine_ticket(), rooms)))
        await wait_until(lambda n=n: adm.engine_waiting == n, timeout=2)  # in arrival order
    # an engine came back but had no room after all: all woken, all back in line
    adm.engines_available(["m"])
    await _spin()
    await wait_until(lambda: adm.engine_waiting == 4, timeout=2)
    assert order == []
    for k in range(4):
        rooms.append(True)
        adm.engine_slot_freed(["m"])
        await wait_until(lambda k=k: len(order) == k + 1, timeout=2)
    await asyncio.gather(*tasks)
    assert order == ["a", "b", "c", "d"]
    assert adm.engine_waiting == 0 and adm.queued == 0


async def test_engines_available_wakes_every_waiter_of_its_models_only() -> None:
    adm = Admission(max_inflight=100, max_queue=10, queue_timeout_s=5.0)
    woken: list[str] = []

    async def wait(model: str) -> None:
        await adm.wait_engine_slot(model, 5.0, adm.engine_ticket())
        woken.append(model)

    tasks = [asyncio.create_task(wait(m)) for m in ("m", "m", "m", "other")]
    await wait_until(lambda: adm.engine_waiting == 4, timeout=2)
    adm.engines_available(["m"])
    await wait_until(lambda: len(woken) == 3, timeout=2)
    await _spin()
    assert woken == ["m", "m", "m"]
    assert adm.engine_waiting == 1
    tasks[-1].cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert adm.engine_waiting == 0 and adm.queued == 0


async def test_queue_full_and_timeout() -> None:
    adm = Admission(max_inflight=100, max_queue=1, queue_timeout_s=5.0)
    first = asyncio.create_task(adm.wait_engine_slot("m", 0.05, adm.engine_ticket()))
    await wait_until(lambda: adm.engine_waiting == 1, timeout=2)
    with pytest.raises(AdmissionRejected) as full:
        await adm.wait_engine_slot("m", 1.0, adm.engine_ticket())
    assert full.value.reason == "queue_full"
    with pytest.raises(AdmissionRejected) as late:
        await first
    assert late.value.reason == "queue_timeout"
    assert adm.engine_waiting == 0


async def test_engine_wakeup_of_a_waiter_cancelled_at_once_goes_to_the_next() -> None:
    """Woken, then cancelled (its client left) before it ran: the cancel is honoured
    and the wake-up passes to the next waiter, not lost until its timeout."""
    adm = Admission(max_inflight=100, max_queue=10, queue_timeout_s=30.0)
    first = asyncio.create_task(adm.wait_engine_slot("m", 30.0, adm.engine_ticket()))
    second = asyncio.create_task(adm.wait_engine_slot("m", 30.0, adm.engine_ticket()))
    await _spin()
    assert adm.engine_waiting == 2
    adm.engine_slot_freed(["m"])  # wakes `first` ...
    first.cancel()  # ... whose client leaves in the same loop turn
    await _spin()
    assert first.cancelled()
    assert second.done() and second.exception() is None
    assert adm.engine_waiting == 0 and adm.queued == 0


async def test_router_slot_handed_to_a_waiter_cancelled_at_once_goes_to_the_next() -> None:
    adm = Admission(max_inflight=1, max_queue=10, queue_timeout_s=30.0)
    await adm.acquire()
    first = asyncio.create_task(adm.acquire())
    second = asyncio.create_task(adm.acquire())
    await _spin()
    assert adm.queued == 2
    adm.release()  # hands the slot to `first` ...
    first.cancel()  # ... whose client leaves in the same loop turn
    await _spin()
    assert first.cancelled()
    assert second.done() and second.exception() is None
    assert adm.inflight == 1 and adm.queued == 0
    adm.release()
    assert adm.inflight == 0


async def test_timeouts_leave_nothing_queued() -> None:
    adm = Admission(max_inflight=1, max_queue=10, queue_timeout_s=0.05)
    await adm.acquire()
    with pytest.raises(AdmissionRejected) as info:
        await adm.acquire()
    assert info.value.reason == "queue_timeout" and adm.queued == 0 and adm.inflight == 1
    with pytest.raises(AdmissionRejected) as info:
        await adm.wait_engine_slot("m", 0.05, adm.engine_ticket())
    assert info.value.reason == "queue_timeout" and adm.engine_waiting == 0


async def _queue_and_release(adm: Admission, requests: list[tuple[str, str, float]]
                             ) -> list[str]:
    """With the one slot held, queue `requests` (tenant, class, cost) in that order,
    then release slots one by one: the order in which the waiters got one."""
    await adm.acquire()
    served: list[str] = []

    async def wait(i: int, tenant: str, klass: str, cost: float) -> None:
        await adm.acquire(tenant, klass, cost)
        served.append(f"{tenant}/{klass}/{i}")

    tasks = [asyncio.create_task(wait(i, *r)) for i, r in enumerate(requests)]
    await wait_until(lambda: adm.queued == len(requests), timeout=2)
    for k in range(len(requests)):
        adm.release()
        await wait_until(lambda k=k: len(served) == k + 1, timeout=2)
    await asyncio.gather(*tasks)
    return served


async def test_waiting_tenants_share_slots_instead_of_first_come_first_served() -> None:
    adm = Admission(max_inflight=1, max_queue=100, queue_timeout_s=30.0)
    # one tenant's batch of 6 arrives first, another's 2 requests just after
    served = await _queue_and_release(adm, [("a", "standard", 10.0)] * 6
                                      + [("b", "standard", 10.0)] * 2)
    tenants = [s.split("/")[0] for s in served]
    assert tenants[:4].count("b") == 2  # b is not stuck behind a's whole batch


async def test_a_lowered_class_waits_behind_the_standard_one() -> None:
    adm = Admission(max_inflight=1, max_queue=100, queue_timeout_s=30.0)
    served = await _queue_and_release(adm, [("a", "batch", 1.0)] * 3
                                      + [("b", "standard", 1.0)] * 2)
    assert [s.split("/")[1] for s in served] == ["standard"] * 2 + ["batch"] * 3


async def test_cached_prompts_cost_less_so_their_tenant_gets_more_through() -> None:
    adm = Admission(max_inflight=1, max_queue=100, queue_timeout_s=30.0)
    served = await _queue_and_release(adm, [("reuse", "standard", 10.0),
                                            ("cold", "standard", 100.0)] * 6)
    first_half = [s.split("/")[0] for s in served[:6]]
    assert first_half.count("reuse") >= 5


async def test_a_waiter_that_leaves_as_the_slot_comes_leaves_the_queue_consistent() -> None:
    """Cancelled, then handed a slot in the same loop turn (the slot goes on to the next
    waiter): the queue's count stays right and the router keeps serving."""
    adm = Admission(max_inflight=1, max_queue=10, queue_timeout_s=30.0)
    await adm.acquire()
    first = asyncio.create_task(adm.acquire("a"))
    second = asyncio.create_task(adm.acquire("b"))
    await _spin()
    first.cancel()  # the client leaves ...
    adm.release()  # ... as a slot frees up
    await _spin()
    assert first.cancelled() and second.done() and second.exception() is None
    assert adm.queued == 0 and adm.inflight == 1
    adm.release()
    assert adm.inflight == 0 and adm.try_acquire()


async def test_the_configured_queue_is_the_one_used() -> None:
    """An empty FairQueue is falsy (it has a length): the one given must still be used,
    with its order and weights."""
    from deepinfer_router.fairness.queue import FairQueue

    adm = Admission(max_inflight=1, max_queue=100, queue_timeout_s=30.0,
                    fair=FairQueue(order="fifo"))
    served = await _queue_and_release(adm, [("a", "batch", 1.0)] * 3
                                      + [("b", "interactive", 1.0)] * 2)
    assert [s.split("/")[0] for s in served] == ["a"] * 3 + ["b"] * 2
    adm = Admission(max_inflight=1, max_queue=100, queue_timeout_s=30.0,
                    fair=FairQueue(weights={"gold": 3.0}))
    served = await _queue_and_release(adm, [("bronze", "standard", 10.0)] * 8
                                      + [("gold", "standard", 10.0)] * 8)
    assert [s.split("/")[0] for s in served[:8]].count("gold") == 6


async def test_lower_classes_leave_slots_to_the_classes_above() -> None:
    from deepinfer_router.fairness.queue import FairQueue

    adm = Admission(max_inflight=4, max_queue=100, queue_timeout_s=30.0, fair=FairQueue(),
                    class_reserve=0.25)  # batch may hold 2 slots, standard + batch 3
    assert adm.try_acquire("batch") and adm.try_acquire("batch")
    assert not adm.try_acquire("batch")
    waiting = asyncio.create_task(adm.acquire("a", "batch"))
    await _spin()
    assert adm.try_acquire("standard") and not adm.try_acquire("standard")
    assert adm.try_acquire("interactive")  # the last slot: found at once
    assert adm.inflight == 4 and not waiting.done()
    adm.release("interactive")  # batch still holds its 2: the batch request waits
    await _spin()
    assert not waiting.done() and adm.inflight == 3
    adm.release("batch")  # a batch slot freed: the waiting batch request takes it
    await asyncio.wait_for(waiting, 1)
    assert adm.inflight == 3


async def test_busy_higher_classes_do_not_starve_a_lower_one() -> None:
    """The limit counts a class's own requests (and lower ones'), not the higher
    classes': with interactive requests holding most slots, batch still gets the rest."""
    from deepinfer_router.fairness.queue import FairQueue

    adm = Admission(max_inflight=10, max_queue=100, queue_timeout_s=30.0, fair=FairQueue(),
                    class_reserve=0.2)  # batch 6, standard + batch 8
    for _ in range(7):
        assert adm.try_acquire("interactive")
    assert adm.try_acquire("batch") and adm.try_acquire("batch") and adm.try_acquire("batch")
    assert not adm.try_acquire("batch") and adm.inflight == 10
    waiting = asyncio.create_task(adm.acquire("a", "batch"))
    await _spin()
    adm.release("interactive")  # batch holds 3 of its 6: it takes the freed slot
    await asyncio.wait_for(waiting, 1)


@pytest.mark.parametrize("reserve", [0.0, 0.25])
async def test_every_waiter_is_served_whatever_the_reserve(reserve: float) -> None:
    from deepinfer_router.fairness.queue import FairQueue

    adm = Admission(max_inflight=4, max_queue=100, queue_timeout_s=30.0, fair=FairQueue(),
                    class_reserve=reserve)
    done: list[str] = []

    async def one(i: int, klass: str) -> None:
        await adm.acquire(f"t{i % 3}", klass)
        await asyncio.sleep(0.001 * (i % 4))
        done.append(klass)
        adm.release(klass)

    classes = ["batch", "standard", "interactive"]
    await asyncio.wait_for(asyncio.gather(*(one(i, classes[i % 3]) for i in range(60))), 10)
    assert len(done) == 60 and adm.inflight == 0 and adm.queued == 0
