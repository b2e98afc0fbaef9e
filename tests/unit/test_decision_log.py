"""The decision log: predictions in tokens, the bounded ring, grading; the usage scan
that reads an answer's cached tokens; kv-aware's explanation of its own decision."""

from __future__ import annotations

import pytest

from deepinfer_router.decision_log import DecisionLog, grade, reportable
from deepinfer_router.proxy.usage import cached_tokens_in
from deepinfer_router.routing.base import Candidate, Decision, RequestFeatures
from deepinfer_router.routing.explain import explain
from deepinfer_router.routing.features import request_features
from deepinfer_router.routing.kv_aware import KvAwareParams, KvAwarePolicy
from deepinfer_router.routing.session import SessionPolicy


def fleet(*cands: tuple[str, int | None]) -> list[Candidate]:
    """(engine, precise tokens or None) per candidate, blocks of 16."""
    out = []
    for engine, tokens in cands:
        c = Candidate(engine, "i-" + engine, block_size=16)
        if tokens is not None:
            c.precise_cached_chars, c.precise_cached_tokens = tokens * 4, tokens
        out.append(c)
    return out


def decided(engine: str, reason: str, held_chars: dict[str, int]) -> Decision:
    """A decision whose policy counted `held_chars` cached per engine (chunks of 64)."""
    return Decision(engine, reason, held={e: c // 64 for e, c in held_chars.items()},
                    chunk_chars=64)


def test_the_estimate_becomes_what_vllm_can_report_cached() -> None:
    assert reportable(250, 10_000, 16) == 240  # whole blocks
    # never the block holding the prompt's last token: 100 tokens all held -> 96
    assert reportable(100, 100, 16) == 96
    assert reportable(100, 97, 16) == 96
    assert reportable(32, 32, 16) == 16
    assert reportable(0, 100, 16) == 0
    assert reportable(15, 100, 16) == 0  # less than a block


def test_predictions_use_precise_figures_where_present() -> None:
    log = DecisionLog(8, 4.0)
    rec = log.record("r1", "m", "kv-aware", decided("a", "prefix", {"a": 4032, "b": 4032}),
                     fleet(("a", 512), ("b", None)), 8000, 0, 0, 1.0)
    assert rec.predicted() == {"a": 512, "b": 1008}  # b: 4032/4 tokens, whole blocks
    assert rec.prompt_tokens == 2000
    body = rec.to_json()
    assert body["index"] == "precise" and body["predicted_cached_tokens"] == 512
    assert [c["index"] for c in body["candidates"]] == ["precise", "approximate"]
    assert body["prompt"] == {"chars": 8000, "tokens": 2000, "tokens_exact": False}
    assert body["actual"] is None
    exact = log.record("r2", "m", "kv-aware", Decision("a", "prefix"), fleet(("a", None)),
                       80, 20, 0, 1.0)
    assert exact.prompt_tokens == 20 and exact.to_json()["prompt"]["tokens_exact"]
    # the engine holds both blocks of a 32-token prompt it saw before, but reuses only
    # the first: the block with the last token is computed again
    again = log.record("r3", "m", "kv-aware", Decision("a", "prefix"), fleet(("a", 32)),
                       128, 32, 0, 1.0)
    assert again.predicted() == {"a": 16}


def test_the_ring_keeps_the_newest_and_a_retry_replaces_its_attempt() -> None:
    log = DecisionLog(3, 4.0)
    for i in range(5):
        log.record(f"r{i}", "m", "p", Decision("a", "least-conn"), fleet(("a", None)), 10, 0,
                   0, float(i))
    assert len(log) == 3 and log.get("r0") is None and log.get("r1") is None
    log.record("r2", "m", "p", Decision("a", "least-conn"), fleet(("a", None)), 10, 0, 1, 9.0)
    assert len(log) == 3
    assert [r.request_id for r in log.recent(10)] == ["r2", "r4", "r3"]
    assert log.get("r2") is not None and log.get("r2").attempt == 1  # type: ignore[union-attr]
    assert [r.request_id for r in log.recent(1)] == ["r2"]
    with pytest.raises(ValueError):
        DecisionLog(0, 4.0)


def test_grading_error_and_misroutes() -> None:
    log = DecisionLog(8, 4.0)
    rec = log.record("r", "m", "kv-aware", Decision("a", "spill"),
                     fleet(("a", 0), ("b", 640)), 4000, 0, 0, 1.0)
    g = grade(rec, 0)
    assert (g.error_tokens, g.misroute, g.best_other_tokens) == (0, True, 640)
    assert rec.to_json()["actual"] == {"cached_tokens": 0, "prediction_error_tokens": 0,
                                       "misroute": True, "best_other_predicted_tokens": 640}
    # the chosen engine held it after all: within a block of the best other, no misroute
    assert not grade(rec, 640 - 16).misroute
    assert grade(rec, 640 - 17).misroute
    # over-prediction is positive error
    rec2 = log.record("r2", "m", "kv-aware", Decision("a", "prefix"),
                      fleet(("a", 320), ("b", 0)), 4000, 0, 0, 1.0)
    g2 = grade(rec2, 288)
    assert g2.error_tokens == 32 and not g2.misroute


def test_a_policy_that_predicts_nothing_is_not_graded() -> None:
    """session, round-robin, least-conn say nothing of what engines hold: an answer's
    cached tokens are shown, but no error (it would read as -cached) and no misroute."""
    log = DecisionLog(8, 4.0)
    rec = log.record("r", "m", "session", Decision("a", "session"),
                     fleet(("a", None), ("b", None)), 4000, 0, 0, 1.0)
    assert not rec.predicts and grade(rec, 512) is None
    assert rec.to_json()["actual"] == {"cached_tokens": 512}
    # kv-aware weighed held prefixes (none held): a prediction of 0, graded
    nothing = log.record("r2", "m", "kv-aware", decided("a", "new-prefix", {}),
                         fleet(("a", None), ("b", None)), 4000, 0, 0, 1.0)
    g = grade(nothing, 512)
    assert nothing.predicts and g is not None and g.error_tokens == -512


def test_the_estimate_counts_in_the_prompts_own_characters_per_token() -> None:
    """6 characters a token (the router tokenized this prompt): 6,000 held characters
    are 1,000 tokens, not 1,500 at the configured 4."""
    log = DecisionLog(8, 4.0)
    rec = log.record("r", "m", "kv-aware", decided("a", "prefix", {"a": 6016}),
                     fleet(("a", None)), 12_000, 2000, 0, 1.0)
    assert rec.predicted() == {"a": 992}  # 6016 / 6 = 1002 tokens -> whole blocks


@pytest.mark.parametrize(("data", "want"), [
    (b'{"usage":{"prompt_tokens":9,"prompt_tokens_details":{"cached_tokens":288}}}', 288),
    (b'{"usage": {"prompt_tokens_details": {"cached_tokens": 0}}}', 0),
    (b'data: {"choices":[],"usage":{"prompt_tokens_details":{"cached_tokens" :\n 32}}}\n\n',
     32),
    (b'{"usage":{"prompt_tokens_details":{"cached_tokens":null}}}', None),
    (b'{"usage":{"prompt_tokens_details":null}}', None),
    (b'{"usage":{"prompt_tokens":9}}', None),
    (b'', None),
    # the number runs to the end of the chunk: it may go on in the next one
    (b'{"usage":{"prompt_tokens_details":{"cached_tokens":28', None),
    # a string mentioning the key is escaped, so only the real key counts
    (b'{"text":"\\"cached_tokens\\":999","usage":{"prompt_tokens_details":'
     b'{"cached_tokens":7}}}', 7),
    (b'{"text":"\\"cached_tokens\\":999"}', None),
    (b'{"cached_tokens":' + b"9" * 40 + b"}", None),
])
def test_cached_tokens_are_read_from_the_answer(data: bytes, want: int | None) -> None:
    assert cached_tokens_in(data) == want


def kv_request(policy: KvAwarePolicy, text: str) -> RequestFeatures:
    return policy.prompt_features({"prompt": text}, "m", None)


def test_kv_aware_decisions_carry_what_it_weighed() -> None:
    policy = KvAwarePolicy(KvAwareParams(chunk_chars=64))
    policy.explaining = True
    cands = [Candidate("a", "ia", kv_capacity_chars=100_000),
             Candidate("b", "ib", kv_capacity_chars=100_000, inflight=2)]
    prompt = "shared system prompt " * 40
    first = kv_request(policy, prompt)
    d1 = policy.select(first, cands, 0.0)
    assert d1.reason == "new-prefix" and d1.weighed is not None and len(d1.weighed) == 2
    policy.on_routed(first, d1, 0.0)
    policy.on_complete(first, d1.engine_id, True, 0.1)
    again = kv_request(policy, prompt + " and a question")
    d2 = policy.select(again, cands, 1.0)
    assert d2.reason == "prefix" and d2.held is not None and d2.load_bound is not None
    by = {t.engine: t for t in explain(cands, d2)}
    assert by[d2.engine_id].cached_chars == d2.matched_chars > 0
    assert not by[d2.engine_id].precise and by[d2.engine_id].cached_tokens is None
    # the chosen engine has the best score among those within the bound
    allowed = [t for t in by.values() if t.within_bound]
    assert max(allowed, key=lambda t: t.score or 0.0).engine == d2.engine_id
    assert by["b"].load == 2.0 and by["b"].load_cost is not None
    # without `explaining` the decision is the same, and carries nothing extra
    policy.explaining = False
    plain = policy.select(again, cands, 1.0)
    assert (plain.engine_id, plain.reason) == (d2.engine_id, d2.reason)
    assert plain.weighed is None and plain.held is None


def test_kv_aware_explanation_names_precise_figures_and_the_session() -> None:
    policy = KvAwarePolicy(KvAwareParams(chunk_chars=64))
    policy.explaining = True
    cands = [Candidate("a", "ia", kv_capacity_chars=100_000),
             Candidate("b", "ib", kv_capacity_chars=100_000)]
    req = request_features({"prompt": "x" * 1000}, "m", "conv-1", with_prompt=True,
                           chunk_chars=64, max_chars=0)
    d = policy.select(req, cands, 0.0)
    policy.on_routed(req, d, 0.0)
    cands[0].precise_cached_chars, cands[0].precise_cached_tokens = 640, 160
    cands[1].precise_cached_chars, cands[1].precise_cached_tokens = 0, 0
    d2 = policy.select(req, cands, 1.0)
    assert d2.session_engine == d.engine_id
    by = {t.engine: t for t in explain(cands, d2)}
    assert by["a"].precise and by["a"].cached_tokens == 160 and by["a"].cached_chars == 640
    assert by["b"].precise and by["b"].cached_chars == 0
    if d2.reason == "session":  # kept on its engine: nothing else was weighed
        assert all(t.load_cost is None for t in by.values())


def test_session_policy_decisions_carry_the_guard_and_binding() -> None:
    policy = SessionPolicy()
    cands = [Candidate("a", "ia", inflight=5), Candidate("b", "ib")]
    req = RequestFeatures(model="m", session_key="s")
    d = policy.select(req, cands, 0.0)
    policy.on_routed(req, d, 0.0)
    d2 = policy.select(req, cands, 1.0)
    assert d2.session_engine == "b" and d2.load_bound is not None
    assert [(t.engine, t.load, t.within_bound) for t in explain(cands, d2)] == [
        ("a", 5.0, False), ("b", 0.0, True)]
