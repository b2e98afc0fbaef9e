"""Round-robin: the baseline. Ignores load and prefixes."""

from __future__ import annotations

from collections.abc import Sequence

from .base import Candidate, Decision, PolicyBase, RequestFeatures


class RoundRobinPolicy(PolicyBase):
    name = "round-robin"

    def __init__(self) -> None:
        self._next = 0

    def select(
        self, request: RequestFeatures, candidates: Sequence[Candidate], now: float
    ) -> Decision:
        # Candidates arrive sorted by id, so the rotation is stable as engines come and go.
        engine = candidates[self._next % len(candidates)]
        self._next += 1
        return Decision(engine.id, "round-robin")
