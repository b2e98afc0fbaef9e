"""Fleet: candidates, stale-proof load, ejection and half-open probes, restarts."""

from __future__ import annotations

import pytest

from deepinfer_router.fleet import Fleet, ScrapedLoad
from deepinfer_router.shared.engine_record import Capacity, EngineRecord


def make_fleet() -> Fleet:
    return Fleet(chars_per_token=4, default_kv_tokens=1000, stale_after_s=5,
                 eject_after_failures=2, eject_cooldown_s=10)


def record(port: int, instance: str = "i", models: list[str] | None = None) -> EngineRecord:
    return EngineRecord(url=f"http://127.0.0.1:{port}", instance=instance,
                        models=models or ["m"], capacity=Capacity(kv_blocks=10, block_size=16))


def test_running_counts_our_finished_requests_once():
    fleet = make_fleet()
    fleet.sync([("local", {r.id: r for r in [record(1)]})])
    state = next(iter(fleet.engines.values()))
    # Scraped while 3 of ours were running there, plus 2 of another router's.
    state.load = ScrapedLoad(running=5, at=100.0, inflight_at_scrape=3)
    (cand,) = fleet.candidates("m", 101.0)
    assert cand.running - cand.inflight == 2  # ours finished since: not foreign load
    state.inflight = 1
    (cand,) = fleet.candidates("m", 101.0)
    assert cand.running == 3 and cand.inflight == 1
    (stale,) = fleet.candidates("m", 200.0)  # scrape too old: our own count only
    assert stale.running == 1 and stale.waiting == 0


def test_capacity_from_scrape_then_record_then_default():
    fleet = make_fleet()
    fleet.sync([("local", {r.id: r for r in [record(1)]})])
    state = next(iter(fleet.engines.values()))
    assert fleet.kv_capacity_chars(state) == 10 * 16 * 4
    state.load = ScrapedLoad(num_gpu_blocks=100, block_size=32, at=1.0)
    assert fleet.kv_capacity_chars(state) == 100 * 32 * 4


def test_ejection_half_open_probe_and_recovery():
    fleet = make_fleet()
    fleet.sync([("local", {r.id: r for r in [record(1)]})])
    state = next(iter(fleet.engines.values()))
    for _ in range(2):
        fleet.request_started(state.id)
        fleet.request_finished(state, ok=False, now=0.0)
    assert state.state(1.0) == "ejected" and not fleet.candidates("m", 1.0)
    assert len(fleet.candidates("m", 11.0)) == 1  # cool-down over: one probe may go
    fleet.request_started(state.id)
    assert not fleet.candidates("m", 11.0)  # the probe is out: nobody else
    fleet.request_finished(state, ok=True, now=11.5)
    assert state.state(12.0) == "healthy" and len(fleet.candidates("m", 12.0)) == 1


def test_restart_and_removal_are_forgotten_and_inflight_survives():
    fleet = make_fleet()
    forgotten: list[str] = []
    fleet.on_forget(forgotten.append)
    r1 = record(1, "a")
    fleet.sync([("local", {r1.id: r1})])
    state = fleet.request_started(r1.id)
    assert state is not None
    r2 = record(1, "b")
    fleet.sync([("local", {r2.id: r2})])
    assert forgotten == [r1.id]
    assert fleet.engines[r1.id].inflight == 1  # the restart kept the count
    fleet.request_finished(state, ok=True, now=1.0)
    assert fleet.engines[r1.id].inflight == 0  # ...and the request counted itself out
    fleet.request_started(r1.id)
    fleet.sync([("local", {})])
    assert forgotten == [r1.id, r1.id] and not fleet.engines
    fleet.request_finished(state, ok=True, now=1.0)  # a request that outlived its engine
    assert state.inflight == 0


def test_routable_listeners_hear_joins_restarts_recoveries_and_undrains():
    fleet = make_fleet()
    heard: list[list[str]] = []
    fleet.on_routable(heard.append)
    a, b = record(1, models=["m", "n"]), record(2)
    fleet.sync([("local", {a.id: a})])
    assert heard == [["m", "n"]]  # joined
    fleet.sync([("local", {a.id: a, b.id: b})])
    assert heard == [["m", "n"], ["m"]]  # only the new one
    heard.clear()
    fleet.sync([("local", {a.id: a, b.id: b})])
    fleet.health_result(b.id, True, 0.0)  # healthy already: nothing new
    fleet.set_draining(b.id, False)  # not draining: nothing new
    assert heard == []
    fleet.health_result(b.id, False, 0.0)
    fleet.health_result(b.id, True, 1.0)
    fleet.set_draining(b.id)
    fleet.set_draining(b.id, False)
    restarted = record(2, instance="j")
    fleet.sync([("local", {a.id: a, restarted.id: restarted})])
    assert heard == [["m"], ["m"], ["m"]]  # back healthy, un-drained, restarted


def test_sources_never_take_over_each_others_engines():
    """The first source to name an id keeps it: a Redis record carrying a static
    engine's id (a predictable hash of its URL) does not replace that engine's URL."""
    f = make_fleet()
    static = EngineRecord(url="http://10.0.0.1:8000", models=["m"])
    hijack = EngineRecord(id=static.id, url="http://10.9.9.9:8000", models=["m"])
    refused = f.sync([("static", {static.id: static}), ("redis", {hijack.id: hijack})])
    assert f.engines[static.id].record.url == "http://10.0.0.1:8000"
    assert f.engines[static.id].source == "static"
    assert [(r.source, r.engine_id) for r in refused] == [("redis", static.id)]


@pytest.mark.parametrize("url", [
    "http://169.254.169.254", "http://[::ffff:169.254.169.254]", "http://[::a9fe:a9fe]",
    "http://[64:ff9b::a9fe:a9fe]", "http://[2002:a9fe:a9fe::1]", "http://metadata.google.internal",
    "http://[fe80::1]:8000", "http://100.100.100.200", "http://0.0.0.0:1",
])
def test_every_source_gets_the_address_checks(url):
    f = make_fleet()
    record = EngineRecord(url=url, models=["m"])
    refused = f.sync([("redis", {record.id: record})])
    assert not f.engines and refused[0].reason
    allowed = Fleet(chars_per_token=4, default_kv_tokens=1000, stale_after_s=5,
                    eject_after_failures=3, eject_cooldown_s=5, allow_private_urls=True)
    assert not allowed.sync([("redis", {record.id: record})])
    assert record.id in allowed.engines


def test_abandoned_request_keeps_the_first_byte_clock_running():
    fleet = Fleet(chars_per_token=4, default_kv_tokens=1000, stale_after_s=5,
                  eject_after_failures=2, eject_cooldown_s=10, first_byte_timeout_s=30)
    r = record(8000)
    fleet.sync([("static", {r.id: r})])
    state = fleet.request_started(r.id)
    assert state is not None
    fleet.request_abandoned(state, sent_at=100.0)  # the client left before the first byte
    assert state.inflight == 0 and state.consecutive_failures == 0
    assert not fleet.check_unanswered(r.id, 129.0)
    assert fleet.check_unanswered(r.id, 130.0) and state.consecutive_failures == 1
    assert not fleet.check_unanswered(r.id, 200.0)  # counted once
    # An answer from the engine in between stops the clock.
    fleet.request_abandoned(fleet.request_started(r.id), sent_at=200.0)  # type: ignore[arg-type]
    fleet.request_finished(fleet.request_started(r.id), True, 201.0)  # type: ignore[arg-type]
    assert not fleet.check_unanswered(r.id, 300.0) and state.consecutive_failures == 0
    # A client that left after the first byte starts no clock.
    fleet.request_abandoned(fleet.request_started(r.id), sent_at=None)  # type: ignore[arg-type]
    assert state.unanswered_since == 0.0


def test_candidates_with_room_filter_by_the_per_engine_limit():
    fleet = Fleet(chars_per_token=4, default_kv_tokens=1000, stale_after_s=5,
                  eject_after_failures=2, eject_cooldown_s=10, max_inflight_per_engine=2)
    fleet.sync([("local", {r.id: r for r in [record(1), record(2)]})])
    a, b = sorted(fleet.engines)
    assert [c.id for c in fleet.candidates_with_room("m", 1.0)[0]] == [a, b]
    for _ in range(2):
        fleet.request_started(a)
    room, at_limit = fleet.candidates_with_room("m", 1.0)
    assert [c.id for c in room] == [b] and at_limit
    assert fleet.candidates_with_room("m", 1.0, exclude=[b]) == ([], True)  # worth a wait
    assert fleet.candidates_with_room("m", 1.0, exclude=[a]) == (
        fleet.candidates("m", 1.0, exclude=[a]), False)
    assert fleet.candidates_with_room("other", 1.0) == ([], False)
    assert len(fleet.candidates("m", 1.0)) == 2  # routable whatever their load
