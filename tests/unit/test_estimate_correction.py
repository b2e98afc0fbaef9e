"""The approximate estimate's over-estimate, learnt per engine from graded answers."""

from __future__ import annotations

import pytest

from deepinfer_router.decision_log import DecisionLog
from deepinfer_router.routing import estimate_correction as ec
from deepinfer_router.routing.base import Candidate, Decision
from deepinfer_router.routing.estimate_correction import EstimateCorrection


def test_no_factor_until_enough_predictions_back_it() -> None:
    c = EstimateCorrection(decay=0.1, min_predicted_tokens=900)
    assert c.factor("a") == 1.0
    c.observe("a", 500, 250)
    assert c.factor("a") == 1.0  # 500 predicted tokens: not enough yet
    c.observe("a", 500, 250)
    assert c.factor("a") == pytest.approx(0.5)
    assert c.factor("b") == 1.0  # per engine


def test_only_an_over_estimate_is_corrected_and_never_below_the_floor() -> None:
    c = EstimateCorrection(decay=0.1, min_predicted_tokens=100)
    c.observe("under", 200, 800)  # the engine reused more than estimated: left as is
    assert c.factor("under") == 1.0
    c.observe("gone", 200, 0)  # estimated, but nothing reused (evicted, restarted)
    assert c.factor("gone") == ec.FLOOR
    c.observe("zero", 0, 512)  # a prediction of 0 says nothing of the scale
    assert "zero" not in c.engines()


def test_recent_answers_count_most() -> None:
    c = EstimateCorrection(decay=0.2, min_predicted_tokens=100)
    for _ in range(50):
        c.observe("a", 1000, 1000)
    assert c.factor("a") == pytest.approx(1.0)
    for _ in range(20):  # the engine starts evicting: the factor follows
        c.observe("a", 1000, 300)
    assert c.factor("a") == pytest.approx(0.3, abs=0.02)


def test_memory_is_bounded_and_engines_can_be_forgotten(monkeypatch: pytest.MonkeyPatch
                                                        ) -> None:
    monkeypatch.setattr(ec, "MAX_ENGINES", 3)
    c = EstimateCorrection(min_predicted_tokens=1)
    for i in range(5):
        c.observe(f"e{i}", 100, 50)
    assert c.engines() == ["e2", "e3", "e4"]
    c.forget("e3")
    assert c.engines() == ["e2", "e4"]
    with pytest.raises(ValueError):
        EstimateCorrection(decay=1.0)


def test_a_decision_says_what_the_estimate_alone_predicted() -> None:
    """The grade teaches the correction from the uncorrected estimate (else it would
    learn its own correction back): held chunks were scaled by the factor in use."""
    log = DecisionLog(4, 4.0)
    approx = Candidate("a", "ia", block_size=16, estimate_factor=0.5)
    precise = Candidate("b", "ib", block_size=16, precise_cached_chars=400,
                        precise_cached_tokens=100)
    # the policy saw 8 chunks of 64 chars on a after the factor: 16 chunks estimated
    d = Decision("a", "prefix", held={"a": 8}, chunk_chars=64)
    rec = log.record("r", "m", "kv-aware", d, [approx, precise], 8000, 2000, 0, 1.0)
    assert rec.estimated("a") == 256  # 16 x 64 chars at 4 chars/token, whole blocks
    assert rec.estimated("b") is None  # its figure was precise
    assert rec.to_json()["candidates"][0]["estimate_factor"] == 0.5
