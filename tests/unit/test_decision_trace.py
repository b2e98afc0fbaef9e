"""The recorded decision trace (tests/support/decision_trace.py) replays through every
policy with identical picks: the routing behaviour is unchanged by code moved around it."""

from __future__ import annotations

import pytest

from tests.support.decision_trace import POLICIES, load, replay

TRACES = load()


@pytest.mark.parametrize("policy", POLICIES)
def test_replay_gives_the_recorded_picks(policy: str) -> None:
    events = TRACES[policy]
    expected = [e["expect"] for e in events if e["op"] == "select"]
    got = replay(policy, events)
    assert len(got) == len(expected) == 500
    mismatches = [(k, want, have) for k, (want, have) in enumerate(zip(expected, got, strict=True))
                  if want != have]
    assert not mismatches, f"{len(mismatches)} different picks, first: {mismatches[:3]}"


def test_the_trace_exercises_every_kind_of_decision() -> None:
    reasons = {e["expect"][1] for e in TRACES["kv-aware"] if e["op"] == "select"}
    assert {"prefix", "session", "new-prefix", "balance", "spill"} <= reasons
    assert {e["op"] for e in TRACES["kv-aware"]} == {"select", "first_token", "complete",
                                                       "forget"}


def test_policy_names_are_one_list() -> None:
    """The settings' choices are the registry's names (factory.POLICY_CLASSES)."""
    import typing

    from deepinfer_router.routing.factory import POLICY_CLASSES
    from deepinfer_router.settings import PolicyName

    assert set(typing.get_args(PolicyName)) == set(POLICY_CLASSES) == set(POLICIES)
