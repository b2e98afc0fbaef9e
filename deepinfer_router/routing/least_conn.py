"""Least-connection: the engine with the least load, ties broken in rotation."""

from __future__ import annotations

from collections.abc import Sequence

from .base import Candidate, Decision, PolicyBase, RequestFeatures


def least_loaded(candidates: Sequence[Candidate], start: int) -> Candidate:
    """The candidate with the smallest load; among equals the first at or after `start`
    (mod n), so ties rotate fairly instead of always landing on the first engine."""
    n = len(candidates)
    best = candidates[start % n]
    best_load = best.load
    for offset in range(1, n):
        cand = candidates[(start + offset) % n]
        load = cand.load
        if load < best_load:
            best, best_load = cand, load
    return best


class LeastConnPolicy(PolicyBase):
    name = "least-conn"

    def __init__(self) -> None:
        self._tie = 0

    def select(
        self, request: RequestFeatures, candidates: Sequence[Candidate], now: float
    ) -> Decision:
        self._tie += 1
        return Decision(least_loaded(candidates, self._tie).id, "least-conn")
