"""The simulated engine's scheduler: prefix reuse, waiting, preemption, timing, counters."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepinfer_engine.sim.cost import CostModel
from deepinfer_engine.sim.model import Request, RequestTooLong, SimEngine, Status, draw_output_len
from deepinfer_engine.sim.tokenizer import render_chat, tokenize


def toks(prefix: str, n: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(n)]


def engine(**kw: object) -> SimEngine:
    args: dict = {"num_blocks": 64, "block_size": 4, "max_num_seqs": 8,
                  "max_num_batched_tokens": 1024, "cost": CostModel()}
    args.update(kw)
    return SimEngine(**args)


def test_hit_and_query_counters_match_hand_computed_values() -> None:
    e = engine()
    prompt = toks("p", 10)  # 2 full blocks of 4 and 2 tokens
    r1 = e.new_request("r1", prompt, 1, now=0.0)
    t = e.run_until_idle(0.0)
    assert (e.stats.prefix_cache_queries, e.stats.prefix_cache_hits) == (10, 0)
    assert r1.num_cached_tokens == 0
    r2 = e.new_request("r2", prompt, 1, now=t)
    e.run_until_idle(t)
    assert (e.stats.prefix_cache_queries, e.stats.prefix_cache_hits) == (20, 8)
    assert r2.num_cached_tokens == 8
    # a prompt of exactly 3 full blocks: the last token is always recomputed (vLLM), so
    # only 2 blocks can hit even though all 3 are cached
    p12 = toks("q", 12)
    e.new_request("r3", p12, 1, now=t)
    t = e.run_until_idle(t)
    r4 = e.new_request("r4", p12, 1, now=t)
    e.run_until_idle(t)
    assert r4.num_cached_tokens == 8
    assert (e.stats.prefix_cache_queries, e.stats.prefix_cache_hits) == (44, 16)
    assert e.cached_prefix_tokens(p12) == 8
    assert e.cached_prefix_tokens(toks("zz", 12)) == 0


def test_prefix_reuse_across_chat_turns_includes_the_answer() -> None:
    e = engine(num_blocks=256)
    turn1 = [{"role": "system", "content": "You are a helpful assistant. " * 10},
             {"role": "user", "content": "Tell me about paged attention."}]
    p1 = tokenize(render_chat(turn1))
    r1 = e.new_request("t1", p1, 12, now=0.0)
    t = e.run_until_idle(0.0)
    assert r1.finished and r1.finish_reason == "length" and r1.num_output == 12
    turn2 = [*turn1, {"role": "assistant", "content": r1.output_text()},
             {"role": "user", "content": "And eviction?"}]
    p2 = tokenize(render_chat(turn2))
    assert p2[: r1.num_tokens] == r1.all_tokens  # prompt and answer come back unchanged
    expected = (r1.num_tokens - 1) // 4 * 4  # KV of all but the last sampled token
    assert e.cached_prefix_tokens(p2) == expected
    r2 = e.new_request("t2", p2, 4, now=t)
    e.run_until_idle(t)
    assert r2.num_cached_tokens == expected > len(p1) - 4


def test_ttft_falls_when_the_prefix_is_cached() -> None:
    cost = CostModel()
    e = engine(num_blocks=2048, block_size=16, max_num_batched_tokens=8192, cost=cost)
    shared = toks("s", 2000)
    r1 = e.new_request("a", [*shared, *toks("x", 16)], 2, now=0.0)
    t = e.run_until_idle(0.0)
    r2 = e.new_request("b", [*shared, *toks("y", 16)], 2, now=t)
    e.run_until_idle(t)
    assert r1.first_token_time is not None and r2.first_token_time is not None
    ttft1 = r1.first_token_time - r1.arrival_time
    ttft2 = r2.first_token_time - r2.arrival_time
    assert ttft1 == pytest.approx(cost.step_time(2016, 0, 0))
    assert r2.num_cached_tokens == 2000
    assert ttft2 == pytest.approx(cost.step_time(16, 0, 0))
    assert ttft2 < ttft1 / 5


def test_decode_timing_and_chunked_prefill() -> None:
    cost = CostModel(overhead_s=0.01, prefill_per_token_s=0.001, decode_per_seq_s=0.002,
                     decode_per_ctx_token_s=0.0)
    e = engine(max_num_batched_tokens=100, cost=cost)
    r = e.new_request("r", toks("p", 250), 3, now=0.0)
    steps = []
    now = 0.0
    while (step := e.schedule(now)) is not None:
        steps.append((step.prefill_tokens, step.decode_seqs))
        now = step.end
        e.finish_step(step)
    assert steps == [(100, 0), (100, 0), (50, 0), (0, 1), (0, 1)]
    assert r.first_token_time == pytest.approx(0.11 + 0.11 + 0.06)
    assert r.finish_time == pytest.approx(0.28 + 2 * 0.012)


def test_request_waits_when_blocks_are_full_then_runs() -> None:
    e = engine(num_blocks=8)
    a = e.new_request("a", toks("a", 20), 8, now=0.0)  # up to 27 computed: 7 blocks
    b = e.new_request("b", toks("b", 20), 4, now=0.0)  # needs 5 blocks to start
    step = e.schedule(0.0)
    assert step is not None and [r.id for r, _ in step.scheduled] == ["a"]
    assert b.status is Status.WAITING and e.num_waiting == 1
    e.finish_step(step)
    now = step.end
    while not a.finished:
        step = e.schedule(now)
        assert step is not None
        assert b.status is Status.WAITING
        now = step.end
        e.finish_step(step)
    e.run_until_idle(now)
    assert a.finish_time is not None and b.scheduled_time is not None
    assert b.finished and b.scheduled_time >= a.finish_time
    assert e.stats.preemptions == 0


def test_max_num_seqs_bounds_the_batch() -> None:
    e = engine(max_num_seqs=2)
    reqs = [e.new_request(f"r{i}", toks(f"r{i}", 8), 3, now=0.0) for i in range(3)]
    e.finish_step(e.schedule(0.0))  # type: ignore[arg-type]
    assert e.num_running == 2 and e.num_waiting == 1
    e.run_until_idle(1.0)
    assert all(r.finished for r in reqs)


def test_preemption_recomputes_the_latest_request() -> None:
    e = engine(num_blocks=6)
    a = e.new_request("a", toks("a", 8), 12, now=0.0)  # grows to 5 blocks
    b = e.new_request("b", toks("b", 8), 12, now=0.0)
    e.run_until_idle(0.0)
    assert e.stats.preemptions >= 1
    assert b.num_preemptions >= 1 and a.num_preemptions == 0
    assert a.finished and b.finished and a.num_output == b.num_output == 12
    assert e.kv.num_free == 6


def test_abort_frees_blocks_at_once() -> None:
    e = engine(num_blocks=16)
    r = e.new_request("r", toks("r", 30), 20, now=0.0)
    step = e.schedule(0.0)
    assert step is not None
    assert e.kv.num_free < 16
    e.abort(r, 0.001)  # mid-step
    assert e.kv.num_free == 16 and e.num_running == 0
    assert e.finish_step(step) == []
    assert r.finish_reason == "abort" and e.stats.finished["abort"] == 1
    assert e.schedule(1.0) is None


def test_finish_reasons_and_lengths() -> None:
    e = engine()
    r1 = e.new_request("a", toks("a", 5), 3, now=0.0)
    r2 = e.new_request("b", toks("b", 5), 2, now=0.0, on_limit="stop")
    e.run_until_idle(0.0)
    assert (r1.finish_reason, r1.num_output) == ("length", 3)
    assert (r2.finish_reason, r2.num_output) == ("stop", 2)
    assert e.stats.generation_tokens == 5 and e.stats.prompt_tokens == 10
    assert e.stats.finished == {"stop": 1, "length": 1, "abort": 0}


def test_length_validation() -> None:
    e = engine(num_blocks=4, max_model_len=100)  # capacity 16 tokens caps max_model_len
    assert e.max_model_len == 16
    with pytest.raises(RequestTooLong):
        e.new_request("x", toks("x", 10), 7, now=0.0)
    with pytest.raises(ValueError):
        e.new_request("x", [], 1, now=0.0)


def test_output_length_distribution() -> None:
    rng = random.Random(1)
    for dist in ("fixed", "uniform", "exponential", "lognormal"):
        draws = [draw_output_len(rng, dist, 100, 400) for _ in range(2000)]
        assert all(1 <= d <= 400 for d in draws)
        assert 70 < sum(draws) / len(draws) < 130, dist
    assert draw_output_len(rng, "fixed", 100, 10) == 10


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(1, 40), st.integers(1, 12),
                          st.booleans()), min_size=1, max_size=25),
       st.integers(4, 40))
def test_block_accounting_invariants(ops: list[tuple[int, int, int, bool]], blocks: int) -> None:
    """Whatever arrives and aborts, blocks are either free or held, never both, and an
    idle engine holds none."""
    e = engine(num_blocks=blocks, max_num_batched_tokens=32, max_num_seqs=4)
    now = 0.0
    live: list[Request] = []
    for prefix, n, max_tokens, abort in ops:
        tokens = toks(f"p{prefix}", n)
        if n + max_tokens > e.max_model_len:
            continue
        live.append(e.new_request(f"r{len(live)}", tokens, max_tokens, now=now))
        step = e.schedule(now)
        if step is not None:
            now = step.end
            e.finish_step(step)
        if abort and live:
            e.abort(live[len(live) // 2], now)
        held = {b.id for r in e.running for b in r.blocks}
        free = set(e.kv.free_order())
        assert not held & free
        assert len(free) == e.kv.num_free
        refs = sum(b.ref_cnt for b in e.kv.blocks)
        assert refs == sum(len(r.blocks) for r in e.running)
    e.run_until_idle(now)
    assert all(r.finished for r in live)
    assert e.kv.num_free == blocks


def run_until_finished(e: SimEngine, req: Request, now: float) -> float:
    while not req.finished:
        step = e.schedule(now)
        assert step is not None
        now = step.end
        e.finish_step(step)
    return now


def test_priority_scheduling_serves_lower_priority_values_first() -> None:
    e = engine(max_num_seqs=1, scheduling_policy="priority")
    batch = [e.new_request(f"b{i}", toks(f"b{i}", 8), 2, now=0.0, priority=2)
             for i in range(3)]
    urgent = e.new_request("i", toks("i", 8), 2, now=0.5, priority=0)
    order = []
    now = 1.0
    while e.has_work:
        step = e.schedule(now)
        assert step is not None
        order += [r.id for r, _ in step.scheduled if r.id not in order]
        now = step.end
        e.finish_step(step)
    assert order == ["i", "b0", "b1", "b2"]  # later but higher: first; ties by arrival
    assert urgent.finished and all(r.finished for r in batch)


def test_priority_preemption_takes_the_lowest_priority() -> None:
    e = engine(num_blocks=8, scheduling_policy="priority", max_num_batched_tokens=64)
    low = e.new_request("low", toks("l", 12), 12, now=0.0, priority=5)
    high = e.new_request("high", toks("h", 12), 12, now=0.1, priority=0)
    now = run_until_finished(e, high, 0.0)
    assert high.num_preemptions == 0 and low.num_preemptions >= 1
    e.run_until_idle(now)
    assert low.finished


def test_fcfs_refuses_a_priority_as_vllm_does() -> None:
    with pytest.raises(ValueError, match="Priority scheduling is not enabled"):
        engine().new_request("a", toks("a", 4), 1, now=0.0, priority=1)


def test_priority_preemption_takes_back_a_request_admitted_before() -> None:
    """The lowest priority is preempted even when it was admitted first (and scheduled
    already in this step), as vLLM's priority policy does."""
    e = engine(num_blocks=8, scheduling_policy="priority", max_num_batched_tokens=64)
    low = e.new_request("low", toks("l", 12), 12, now=0.0, priority=5)
    step = e.schedule(0.0)
    assert step is not None
    e.finish_step(step)
    high = e.new_request("high", toks("h", 12), 12, now=step.end, priority=0)
    now = run_until_finished(e, high, step.end)
    assert high.num_preemptions == 0 and low.num_preemptions >= 1
    e.run_until_idle(now)
    assert low.finished and low.finish_time > high.finish_time
