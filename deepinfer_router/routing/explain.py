"""A decision read back: what the policy saw of each candidate when it decided, for
`GET /admin/decisions/{request_id}` and the grading of the decision once the engine has
answered (decision_log.py).

Nothing here runs per request: the policy leaves its figures on the Decision as a
by-product of deciding (kv-aware's `explaining`), the candidates are the objects it saw
(fresh per decision, never changed after), and `explain` builds the view on reading."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .base import Candidate, Decision
from .guard import within


@dataclass(frozen=True, slots=True)
class CandidateTerms:
    engine: str
    # Prompt characters the policy counted as cached there, and where that figure came
    # from: the engine's own KV events (`precise`) or the router's estimate.
    cached_chars: int
    precise: bool
    cached_tokens: int | None  # raw cached tokens from the KV events (every tier)
    load: float  # in flight from this router + waiting at the engine (what the guard counts)
    # What the policy weighed, None where the decision did not need it (a session kept
    # on its engine weighs nothing): load cost in request units (pending prefill
    # included), cache pressure in prefill chars, score.
    load_cost: float | None
    pressure_chars: float | None
    score: float | None
    within_bound: bool | None  # the bounded-load guard's verdict; None: no guard applied
    block_size: int  # the engine's KV block size in tokens (0: unknown)


def explain(candidates: Sequence[Candidate], decision: Decision) -> list[CandidateTerms]:
    held = decision.held or {}
    weighed = decision.weighed or {}
    unit = decision.chunk_chars
    bound = decision.load_bound
    out = []
    for c in candidates:
        cost, pressure, score = weighed.get(c.id, (None, None, None))
        out.append(CandidateTerms(
            engine=c.id, cached_chars=held.get(c.id, 0) * unit,
            precise=c.precise_cached_chars is not None, cached_tokens=c.precise_cached_tokens,
            load=c.load, load_cost=cost, pressure_chars=pressure, score=score,
            within_bound=None if bound is None else within(c.load, bound),
            block_size=c.block_size,
        ))
    return out
