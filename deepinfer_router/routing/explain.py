"""What a policy saw when it decided, so that a decision can be read back later
(`GET /admin/decisions/{request_id}`) and graded against what the engine then reported it
had cached.

Built for every routed request while the router keeps a decision log, so it is cheap to
build: the candidates as the policy saw them (fresh objects per decision, never changed
after it) and the policy's per-candidate figures as plain columns; the per-candidate view
(`terms()`) is made only when someone reads it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # base.py imports this module
    from .base import Candidate


@dataclass(frozen=True, slots=True)
class CandidateTerms:
    engine: str
    # Prompt characters the policy counted as cached there, and where that figure came
    # from: the engine's own KV events (`precise`) or the router's estimate.
    cached_chars: int
    precise: bool
    cached_tokens: int | None  # raw cached tokens from the KV events (every tier)
    load: float  # in flight from this router + waiting at the engine (what the guard counts)
    load_cost: float  # request units, pending prefill included (kv-aware)
    pressure_chars: float  # cache pressure of placing the prompt's uncached rest there
    score: float | None  # kv-aware's score; None for policies that do not score
    within_bound: bool  # the bounded-load guard lets it take this request
    block_size: int  # the engine's KV block size in tokens (0: unknown)


@dataclass(frozen=True, slots=True)
class Explanation:
    candidates: Sequence[Candidate]
    cached_chars: Sequence[int]  # per candidate, in order
    load_cost: Sequence[float]
    pressure_chars: Sequence[float]
    load_bound: float | None  # the guard's bound on load + 1; None where no guard applies
    session_engine: str | None  # the engine the request's session was bound to, if any
    # Score = cached chars - load_cost_chars x load cost - pressure (kv-aware); None: the
    # policy does not score.
    load_cost_chars: float | None = None

    def terms(self) -> list[CandidateTerms]:
        from .guard import within  # guard imports base, which imports this module

        bound = self.load_bound
        lcc = self.load_cost_chars
        out = []
        for c, got, cost, pressure in zip(self.candidates, self.cached_chars, self.load_cost,
                                          self.pressure_chars, strict=True):
            out.append(CandidateTerms(
                engine=c.id, cached_chars=got, precise=c.precise_cached_chars is not None,
                cached_tokens=c.precise_cached_tokens, load=c.load, load_cost=cost,
                pressure_chars=pressure,
                score=None if lcc is None else got - lcc * cost - pressure,
                within_bound=bound is None or within(c.load, bound),
                block_size=c.block_size,
            ))
        return out
