"""session: keep each session on one engine (a binding with a TTL), otherwise spread by
least load. No prompt hashing, so it is cheap and suits engines without prefix caching
or prompts that share nothing. The binding is broken only by the bounded-load guard
(`spill`) or when its engine is gone (ejected, draining, removed, restarted)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from . import reasons
from .base import Candidate, Decision, PolicyBase, RequestFeatures
from .guard import BoundedLoad
from .least_conn import least_loaded
from .session_affinity import SessionAffinity, SessionTable

if TYPE_CHECKING:
    from ..settings import RouterSettings


class SessionPolicy(PolicyBase):
    name = "session"
    needs_prompt = False

    @classmethod
    def from_settings(cls, settings: RouterSettings, *, hint_outbox: int = 0) -> SessionPolicy:
        return cls(
            session_ttl_s=settings.session_ttl_s,
            max_sessions=settings.max_sessions,
            balance_factor=settings.balance_factor,
            balance_slack=settings.balance_slack,
        )

    def __init__(
        self,
        *,
        session_ttl_s: float = 1800.0,
        max_sessions: int = 200_000,
        balance_factor: float = 1.25,
        balance_slack: int = 0,
    ) -> None:
        self.balance_factor = balance_factor
        self.balance_slack = balance_slack
        self._affinity = SessionAffinity(session_ttl_s, max_sessions)
        self._tie = 0

    @property
    def sessions(self) -> SessionTable:
        return self._affinity.table

    def state_sizes(self) -> dict[str, int]:
        return {"sessions": len(self._affinity.table)}

    def select(
        self, request: RequestFeatures, candidates: Sequence[Candidate], now: float
    ) -> Decision:
        affinity = self._affinity
        affinity.sync(candidates)
        key = request.session_key
        if not key:
            return Decision(self._least_loaded(candidates).id, reasons.LEAST_CONN)
        bound = affinity.bound(key, candidates, now)
        if bound is None:
            return Decision(self._least_loaded(candidates).id, reasons.SESSION_NEW)
        guard = BoundedLoad(candidates, self.balance_factor, self.balance_slack)
        if guard.allows(bound):
            return Decision(bound.id, reasons.SESSION, load_bound=guard.limit,
                            session_engine=bound.id)
        return Decision(self._least_loaded(candidates).id, reasons.SPILL,
                        load_bound=guard.limit, session_engine=bound.id)

    def _least_loaded(self, candidates: Sequence[Candidate]) -> Candidate:
        # The least loaded engine always passes the guard (its load is at most average).
        self._tie += 1
        return least_loaded(candidates, self._tie)

    def on_routed(self, request: RequestFeatures, decision: Decision, now: float) -> None:
        self._affinity.bind(request.session_key, decision.engine_id, now)

    def forget_engine(self, engine_id: str) -> None:
        self._affinity.forget(engine_id)
