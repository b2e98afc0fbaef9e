"""The bounded-load guard (consistent hashing with bounded loads, as KubeAI uses it):
an engine may take a request only while

    load + 1 <= ceil(c * (total load + 1) / number of candidates) + slack

with load = requests in flight at this router + requests waiting at the engine. With
integer loads the least loaded engine always passes (its load is at most the average),
so the guard never leaves a request without an engine; affinity (a session, a cached
prefix) is kept until its engine is `c` times busier than the average, then it spills.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .base import Candidate

_EPS = 1e-9  # float noise in c*(T+1)/n must not move the ceiling


def load_limit(total_load: float, n_candidates: int, factor: float, slack: int = 0) -> float:
    """The largest load an engine may reach by taking this request."""
    if n_candidates <= 0:
        raise ValueError("no candidates")
    return math.ceil(factor * (total_load + 1.0) / n_candidates - _EPS) + slack


def within(load: float, limit: float) -> bool:
    return load + 1.0 <= limit + _EPS


class BoundedLoad:
    """The guard for one decision: computed once over the candidates, O(n)."""

    __slots__ = ("limit",)

    def __init__(self, candidates: Sequence[Candidate], factor: float, slack: int = 0) -> None:
        total = 0.0
        for cand in candidates:
            total += cand.inflight + cand.waiting
        self.limit = load_limit(total, len(candidates), factor, slack)

    def allows(self, cand: Candidate) -> bool:
        return cand.inflight + cand.waiting + 1.0 <= self.limit + _EPS
